"""The studies' tests run with the product tests' environment and fixtures: tests/conftest.py,
imported (its module code sets the offline, throwaway-MLflow and Prefect environment; the
fixtures named here are registered for studies/tests as if defined in this file)."""

from tests.conftest import PROJECT_ROOT, shared_data, synthetic_root, tiny_params, trained_run  # noqa: F401

"""Tests of the study code (run with ``python -m pytest -q studies/tests``; not in the default test paths)."""

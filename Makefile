# The two commands a newcomer needs: `make demo` (the main job, offline, on a CPU) and
# `make test` (the default test suite). Both create the virtual environment on first use.
# `make docs` builds the documentation site (docs/, mkdocs.yml) into site/.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on this project's machines these come from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1

# Offline-safe defaults for everything started from here.
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The flow's temporary Prefect server needs about 22 s to start on 2 cores (default limit: 20 s).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# Material for MkDocs prints a banner about its successor on every build; it is not a warning.
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: install demo test test-slow test-studies docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,deploy,docs]'
	touch $@

install: $(VENV)/.installed

# The main job: the Prefect pipeline flow (data through DVC, fit, test, ablate, report,
# register, promote) on the embedded default; outputs in out/, the registry in mlflow.db.
demo: install
	$(VENV)/bin/dualstpm demo

test: install
	$(PY) -m pytest -m "not slow" -q

# The long tests (serving, the training limit, a crash during registration, flow vs DVC,
# dvc exp runs). Exit code 5 means none was collected: a failure here, not a pass.
# The DVC-vs-flow tests run in a process of their own: their figures are compared exactly,
# and torch keeps process-wide state (thread pools) that earlier flow tests leave behind.
SLOW_DVC := tests/test_pipeline_dvc.py
test-slow: install
	$(PY) -m pytest -m slow -q $(SLOW_DVC) || { rc=$$?; [ $$rc -ne 5 ] || echo "no slow DVC tests were collected" >&2; exit $$rc; }
	$(PY) -m pytest -m slow -q --ignore=$(SLOW_DVC) || { rc=$$?; [ $$rc -ne 5 ] || echo "no slow tests were collected" >&2; exit $$rc; }

# The tests of the study code in studies/ (outside the default test paths), slow ones included.
# Exit code 5 (no test collected) fails here too.
test-studies: install
	$(PY) -m pytest -q studies/tests || { rc=$$?; [ $$rc -ne 5 ] || echo "no studies tests were collected" >&2; exit $$rc; }

# The documentation site, warnings as errors: a broken link, a missing anchor or an
# unresolved API reference fails the build (tests/test_docs.py runs the same build).
docs: install
	$(VENV)/bin/mkdocs build --strict

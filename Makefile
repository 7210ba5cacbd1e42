# The two commands a newcomer needs: `make demo` (the main job, offline, on a CPU) and
# `make test` (the default test suite). Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on this project's machines these come from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1

# Offline-safe defaults for everything started from here.
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install demo test test-slow

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dualstpm demo

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

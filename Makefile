# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
# Each creates (or reuses) the project's virtualenv first, so either can come first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; an unpinned torch pulls a multi-GB CUDA build. Installed before the project.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart sdss test test-all lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/tuner run studies/quickstart.yaml

sdss: setup
	$(VENV)/bin/tuner run studies/sdss_qso.yaml

test: setup
	$(PY) -m pytest -m "not slow"

test-all: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) mlruns optuna.db

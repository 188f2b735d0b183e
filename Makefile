# Two commands do all set-up and use on a fresh machine:
#   make quickstart   create .venv if missing, install, run `mmalign quickstart`
#   make test         create .venv if missing, install, run the tests
# Both install the exact versions the suite passed with: requirements/cpu.lock on machines without an NVIDIA GPU
# (no `nvidia-smi`; CPU torch, so no CUDA wheel is ever pulled), requirements/gpu.lock with one (CUDA torch and the
# nvidia-* wheels from PyPI, plus the `gpu` extra). Each lock holds the package's dependencies and its `test`
# extra; the package itself goes in editable on top (`--no-deps`). Override the choice with TORCH=cpu|gpu.
# The locks carry hashes: pip then takes only those files (on a GPU machine whose pip also sees a local
# torch-2.13.0+cpu wheel, `torch==2.13.0` alone would match the CPU build).
# Installs are idempotent: a stamp keyed by the hash of pyproject.toml + the lock skips pip when nothing changed.
#   make lock         re-resolve both locks to the newest versions pyproject.toml allows (uv pip compile; torch
#                     stays at constraints-cpu.txt's version), recreate .venv from the new lock and run the suite.
#                     Commit requirements/*.lock only if it is green.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
ifeq ($(filter cpu gpu,$(TORCH)),)
$(error TORCH must be cpu or gpu, not '$(TORCH)')
endif
LOCK := requirements/$(TORCH).lock
HASH := $(shell cat pyproject.toml $(LOCK) 2>/dev/null | cksum | cut -d' ' -f1)-$(TORCH)
PYTEST_ARGS ?=

# `make lock`: the locks are resolved for this Python and platform (the CI and project machines').
LOCK_PYTHON ?= 3.11
LOCK_PLATFORM ?= x86_64-manylinux_2_28
# Empty to keep every version the current lock already has that still fits (e.g. after adding a dependency);
# `--upgrade-package NAME` to move one package.
LOCK_UPGRADE ?= --upgrade
# uv from PATH, else installed with pip into .lock-tools/ on first use.
UV ?= $(shell command -v uv 2>/dev/null || echo .lock-tools/bin/uv)
# Where the CPU torch wheel is found: pip's configured find-links when there are any, else PyTorch's CPU index.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_CPU_SOURCE ?= $(if $(strip $(FIND_LINKS)),$(foreach d,$(FIND_LINKS),--find-links $(d)),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV_COMPILE := $(UV) pip compile pyproject.toml --extra test --python-version $(LOCK_PYTHON) \
	--python-platform $(LOCK_PLATFORM) --generate-hashes --quiet --custom-compile-command "make lock" $(LOCK_UPGRADE)

# The note each lock starts with (under uv's two header lines).
define LOCK_NOTE_cpu
# CPU-only machines (Linux x86_64, Python $(LOCK_PYTHON)). `make` installs this file, then mmalign itself (--no-deps):
# mmalign's dependencies and its `test` extra at the versions the suite passed with. torch is constraints-cpu.txt's
# +cpu build, from pip's find-links or PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu);
# all else from PyPI. Refresh with `make lock`, not by hand.
endef
define LOCK_NOTE_gpu
# NVIDIA GPU machines (Linux x86_64, Python $(LOCK_PYTHON)). `make` installs this file, then mmalign itself (--no-deps):
# resolved like cpu.lock, but CUDA torch from PyPI (constraints-cpu.txt's version without +cpu) with its nvidia-*
# wheels, plus the `gpu` extra (xformers, bitsandbytes; their metadata admits this torch). Resolved by `make lock`
# on a CPU machine: `make test` on a GPU machine is what checks it. Refresh with `make lock`, not by hand.
endef
export LOCK_NOTE_cpu LOCK_NOTE_gpu

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test install install-test lock lock-files clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The lock is complete (pip check proves it), so nothing is resolved at install time. The editable install builds
# with the lock's setuptools (no build isolation, which would fetch the newest setuptools).
$(VENV)/.installed-$(HASH): $(PY)
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; v == "$(LOCK_PYTHON)" or print("warning: $(LOCK) is resolved for Python $(LOCK_PYTHON), $(VENV) has Python " + v + " (make clean-venv; make PYTHON=python$(LOCK_PYTHON) ...)")'
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(HASH)

# The locks hold the `test` extra: one environment for `make quickstart` and `make test`.
install-test: install

quickstart: install
	$(VENV)/bin/mmalign quickstart

# The architecture's import contracts (pyproject.toml [tool.importlinter]) first, then the suite.
test: install-test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

.lock-tools/bin/uv:
	$(PYTHON) -m venv .lock-tools
	.lock-tools/bin/pip install -q uv

# Re-resolve both locks (no install, no tests). The GPU lock takes torch at constraints-cpu.txt's version without
# `+cpu` and no find-links (a local CPU wheel would match `==2.13.0`), and the `gpu` extra.
lock-files: $(UV)
	mkdir -p requirements
	$(UV_COMPILE) -c constraints-cpu.txt $(TORCH_CPU_SOURCE) -o requirements/cpu.lock
	sed 's/+cpu//' constraints-cpu.txt > requirements/.torch-gpu.txt
	$(UV_COMPILE) --extra gpu -c requirements/.torch-gpu.txt -o requirements/gpu.lock
	rm -f requirements/.torch-gpu.txt
	! grep -q '^torch==.*+' requirements/gpu.lock || { echo "requirements/gpu.lock got a local torch build (UV_FIND_LINKS?)"; exit 1; }
	for k in cpu gpu; do f=requirements/$$k.lock; eval note=\"\$$LOCK_NOTE_$$k\"; \
	  { head -n 2 $$f; printf '%s\n' "$$note"; tail -n +3 $$f; } > $$f.tmp && mv $$f.tmp $$f; done

# New locks, then a fresh .venv from this machine's lock and the whole suite. Green: commit requirements/*.lock.
# Red: the new locks stay for inspection; `git checkout requirements/` returns to the tested ones.
lock: lock-files
	rm -rf $(VENV)
	$(MAKE) test || { echo "make lock: the suite fails with the new $(LOCK); do not commit it (git diff requirements/)"; exit 1; }
	@echo "make lock: green with the new $(LOCK); review and commit requirements/*.lock"

clean-venv:
	rm -rf $(VENV)

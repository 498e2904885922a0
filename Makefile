# The README's two commands: `make test` and `make demo`. Everything else is a step they use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export DS_ACCELERATOR ?= $(if $(HAS_GPU),cuda,cpu)
export TRITON_INTERPRET ?= $(if $(HAS_GPU),0,1)
export PYTHONUNBUFFERED := 1

.PHONY: setup build test demo bench gpu-check clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0: on a GPU machine PyPI's CUDA build (which brings its own triton);
	# without one, the CPU build plus triton for the interpreter.
	$(PIP) install -q torch==2.13.0 $(if $(HAS_GPU),,triton==3.9.0)
	$(PIP) install -q -r requirements.txt
	touch $@

setup: $(VENV)/.deps

# wsshm._C is compiled again only when its sources, setup.py or this file (which pins torch) change:
# a full build takes minutes. New requirements alone do not recompile it.
BUILT := $(VENV)/.wsshm-built
$(BUILT): setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h) | $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)
	$(PY) -c "import wsshm, wsshm.kernels, wsshm._C; print('wsshm', wsshm.__version__, 'built:', wsshm._C.build_info())"

test: build
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

demo: build
	$(PY) -m wsshm.demo

bench: build
	set -e; for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b --quick; done

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info wsshm/_C*.so runs/demo $(BUILT)

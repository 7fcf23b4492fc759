# Fresh-machine entry points: `make demo` (set up, then run the main job) and `make test` (set up, then test).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# nvcc on PATH may be a wrapper script; point the build at the toolkit itself
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) $(CUDA_PATH))
STAMP := $(VENV)/.installed
GPU_STACK := $(VENV)/gpu-stack
BUILD_INPUTS := requirements.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test clean check-aarch64

setup: $(STAMP) $(GPU_STACK)/.built

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# the GPU machine's torch and Triton beside the pinned ones (requirements-gpu-stack.txt says why), and the
# extension's CPU kernels built against that torch (a build for one torch does not load under another)
$(GPU_STACK)/.installed: requirements-gpu-stack.txt | $(STAMP)
	rm -rf $(GPU_STACK)
	$(PY) -m pip install -q --target $(GPU_STACK)/site -r requirements-gpu-stack.txt
	touch $@

$(GPU_STACK)/.built: $(BUILD_INPUTS) $(GPU_STACK)/.installed
	rm -rf $(GPU_STACK)/ext $(GPU_STACK)/build
	PYTHONPATH=$(GPU_STACK)/site FORCE_CPU=1 $(PY) setup.py -q build_ext --build-lib $(GPU_STACK)/ext \
		--build-temp $(GPU_STACK)/build
	touch $@

demo: $(STAMP)
	$(PY) -m model.demo

# one pytest-xdist worker per logical CPU, tests handed out one at a time as workers free up, the longest first
# (tests/conftest.py; they are single-threaded Python: Dynamo traces, Triton compiles, subprocess suites);
# TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= logical
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1

clean:
	rm -rf build *.egg-info fused_mtl_attn/*.so

# Compile the C++ sources for aarch64 (needs apt's g++-aarch64-linux-gnu): off x86 the baseline kernels must build.
AARCH64_CXX ?= aarch64-linux-gnu-g++
check-aarch64: setup
	@flags="$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths as p; \
	print(' '.join('-I' + i for i in p() + [sysconfig.get_paths()['include'], 'csrc']))")"; \
	for f in csrc/attention.cpp csrc/cpu/*.cpp; do \
	  $(AARCH64_CXX) -std=c++20 -O2 -fPIC $$flags -c $$f -o /dev/null || exit 1; echo "aarch64: $$f compiles"; \
	done

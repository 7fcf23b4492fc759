# Fresh-machine entry points: `make demo` (set up, then run the main job) and `make test` (set up, then test).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# nvcc on PATH may be a wrapper script; point the build at the toolkit itself
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) $(CUDA_PATH))
STAMP := $(VENV)/.installed
BUILD_INPUTS := requirements.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) -m model.demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build *.egg-info fused_mtl_attn/*.so

# calibkern: `make test` and `make demo` build everything they need into .venv from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.calibkern-installed

.PHONY: install test demo bench gpu-check gpu-compile clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (a CPU wheel here; keep your CUDA build elsewhere), then the package without build
# isolation so the C++ extension compiles against the installed torch.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/*.cpp csrc/*.h calibkern/_build.py)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q ninja
	$(PIP) install -q --no-build-isolation -e ".[dev,hf,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m calibkern demo

bench: $(STAMP)
	$(PY) benchmarks/run_benchmarks.py

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# every Triton kernel at every launch configuration, compiled for sm_80 and sm_90 (no GPU needed; about 40
# minutes an arch on 2 cores, seconds with Triton's cache); GPU_COMPILE_ARCH="80 90 100" adds sm_100
GPU_COMPILE_ARCH ?= 80 90
gpu-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) benchmarks/triton_compile.py --shapes all --arch $(GPU_COMPILE_ARCH) \
		--json benchmarks/results/triton_compile.json

clean:
	rm -rf $(VENV) build *.egg-info calibkern/_C*.so calibkern/_build_config.py

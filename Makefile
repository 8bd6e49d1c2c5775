# calibkern: `make test` and `make demo` build everything they need into .venv from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.calibkern-installed

.PHONY: install test test-isa demo bench gpu-check gpu-compile clean

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

# The kernel, fuzzer and HF-parity tests run twice: on the ahead-of-time build for this CPU (-march=native), then
# on a build for x86-64-v3 (AVX2, no AVX-512) compiled at first use into the venv's own cache, so that a result
# that holds on one instruction set only fails here (docs/reliability.md#what-is-bitwise-equal-to-what).
ISA_MARCH ?= x86-64-v3
ISA_TESTS ?= tests/test_cpp_backend.py tests/test_row_metrics.py tests/test_determinism.py tests/test_fuzz.py \
	tests/test_fused_linear.py tests/test_apply_fused_loss.py tests/test_hf_models.py

test: $(STAMP)
	$(PY) -m calibkern info
	$(PY) -m pytest -q --durations=15 tests
	$(MAKE) --no-print-directory test-isa

test-isa: $(STAMP)
	@if grep -qw avx2 /proc/cpuinfo; then \
		export CALIBKERN_MARCH=$(ISA_MARCH) CALIBKERN_CACHE=$(abspath $(VENV))/calibkern-cache && \
		$(PY) -m calibkern info && $(PY) -m pytest -q -p no:cacheprovider $(ISA_TESTS); \
	else echo "test-isa: this CPU has no AVX2; the $(ISA_MARCH) run is skipped"; fi

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

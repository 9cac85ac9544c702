# Everyday targets. `make test`, `make bench` and `make docs` work on a fresh clone: they create or
# refresh the local virtual environment .venv first (idempotent: stamp files track their inputs).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-slow bench bench-full bench-parallel microbench lint format info clean install-check docs

venv: $(STAMP)

# The extension is rebuilt in place (ahead of time, fused_ls/build.py) when any csrc/ source changes.
CSRC    := $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)

$(STAMP): requirements-dev.txt setup.py pyproject.toml fused_ls/build.py $(CSRC)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -r requirements-dev.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The long-running tests (marked slow, left out of `make test`): the compatibility sweep over every
# causal-LM and image-text-to-text class of the installed transformers. CI runs them once.
test-slow: venv
	$(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

# The main job, quick (target: at most 4 minutes on 2 quiet cores): the loss against eager,
# torch.compile and the copy/read floors at one LM size, the fixed cost at one classifier size, the
# fused LM head at one size, each printed as it is measured (benchmarks/headline.py). Markdown and
# CSV under bench_out/.
bench: venv
	$(VPY) benchmarks/headline.py

# The full sweep: the loss at LM sizes for every backend, the fixed cost at classifier sizes and
# every mode, the fused LM head at six sizes (tens of minutes on 2 cores).
bench-full: venv
	$(VPY) benchmarks/bench.py
	$(VPY) benchmarks/bench_overhead.py
	$(VPY) benchmarks/bench_linear.py

# Vocabulary parallelism: 2 gloo processes on this machine vs one process and torch's loss_parallel.
bench-parallel: venv
	$(VPY) benchmarks/bench_parallel.py

# Per-op micro-benchmarks (pytest-benchmark); timings only, correctness lives in tests/.
microbench: venv
	$(VPY) -m pytest -q benchmarks/test_micro.py --benchmark-enable --benchmark-columns=median,iqr,rounds

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: venv
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

info: venv
	$(VPY) -m fused_ls.info

# The docs site: mkdocs (+ material, mkdocstrings) installed into .venv beside the package, which
# mkdocstrings imports to read the signatures the entry points get at import time; --strict makes
# every warning (a broken link, a docstring it cannot read) an error. Output: site/.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): requirements-docs.txt $(STAMP)
	$(VPY) -m pip install -q -r requirements-docs.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --clean --site-dir site
	$(VPY) scripts/check_docs.py site

# Install as a user does: a clean copy of the tracked files, `pip install` with build isolation into
# a fresh venv that has torch, the kernels built on first use (tests/test_install.py; a few minutes).
install-check: venv
	FUSED_LS_INSTALL_TEST=1 $(VPY) -m pytest -q -s tests/test_install.py

clean:
	rm -rf build *.egg-info fused_ls/*.so fused_ls/*.so.json bench_out site

# Compile-check the CUDA kernels (csrc/cuda) for sm_80 and sm_90 against the CUDA build of torch,
# on a machine with nvcc and no GPU (docs/design.md §6). Fails on any compile error; nothing runs.
CUDA_VENV  := .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_ARCHS ?= 8.0;9.0

.PHONY: cuda-check
$(CUDA_VENV)/.installed:
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q --upgrade pip
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" numpy setuptools wheel ninja
	touch $@

cuda-check: $(CUDA_VENV)/.installed
	@command -v nvcc >/dev/null || { echo "cuda-check: nvcc not found on PATH"; exit 1; }
	here=$$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#[$$] _HERE_=//p'); \
	CUDA_HOME=$${CUDA_HOME:-$$(dirname "$$here")} TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	FUSED_LS_STRICT_BUILD=1 MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py build_ext --force \
	    --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
	$(CUDA_VENV)/bin/python -c "import glob, torch; \
	torch.ops.load_library(glob.glob('build/cuda-check/lib/fused_ls/_C*.so')[0]); \
	ok = torch._C._dispatch_has_kernel_for_dispatch_key('fused_ls::ext_forward', 'CUDA'); \
	assert ok, 'CUDA kernels not registered'; print('cuda-check: CUDA kernels compiled and registered')"

# Triton kernels: compile every specialisation ahead of time for sm_90 and sm_80 (no GPU needed).
.PHONY: triton-check gpu-check
triton-check: venv
	$(VPY) scripts/triton_check.py

# On a GPU machine: device name, the test suites on CUDA tensors, and the benchmark table + CSV.
# GPU_PY: a python with a CUDA build of torch (the default .venv holds the CPU build).
GPU_PY ?= $(VPY)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

# The peers' wheels for the GPU machine (it has no network): carry wheels/ with the run;
# scripts/gpu_lease.sh installs them with --no-deps.
.PHONY: gpu-wheels
gpu-wheels: venv
	$(VPY) -m pip download -q --no-deps -d wheels liger-kernel==0.8.5

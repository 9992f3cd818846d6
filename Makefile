# The README's commands. Everything goes into .venv (created if missing); the native extension is
# rebuilt only when its sources change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
export MAX_JOBS ?= 2

.PHONY: install test demo bench lint clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q

demo: install
	$(VENV)/bin/l2p-fast compare --methods l2p,seq,seq-frozen,ewc,er,joint --batch-size 8 --top-k 2 --prompt-mask --head-type gap --output runs/demo --resume

bench: install
	$(PY) -m pytest bench --benchmark-only

# On a machine with an NVIDIA GPU: the whole test suite (CUDA and Triton on CUDA tensors included) and a short
# benchmark, ~5 min; writes gpu-check/summary.md (or $OUT/summary.md). Without a GPU it stops at once.
gpu-check:
	@command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU || \
		{ echo "gpu-check: no NVIDIA GPU found (nvidia-smi is missing or lists none); run it on a machine with a CUDA GPU" >&2; exit 2; }
	$(MAKE) install
	$(PY) scripts/gpu_check.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info l2p_fast/_C*.so $(VENV)/.built

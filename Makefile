# The README's commands. Everything goes into .venv (created if missing); the native extension is
# rebuilt only when its sources change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
export MAX_JOBS ?= 2

.PHONY: install test demo demo-readme bench lint clean gpu-check

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

# the demo: every method of the settings file (chosen on the validation split by scripts/sweep.py), 3 seeds
DEMO_ARGS := --config sweeps/wordnet20_demo.json --seeds 0,1,2
demo: install
	$(VENV)/bin/l2p-fast compare $(DEMO_ARGS) --output runs/demo --resume

# a fresh demo run whose comparison.json becomes docs/results/demo_comparison.json and the README's results block
demo-readme: install
	rm -rf runs/demo-readme
	$(VENV)/bin/l2p-fast compare $(DEMO_ARGS) --output runs/demo-readme
	mkdir -p docs/results
	cp runs/demo-readme/comparison.json docs/results/demo_comparison.json
	$(VENV)/bin/l2p-fast report docs/results/demo_comparison.json --readme README.md

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

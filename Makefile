# Two entry points for a new user: `make train` and `make test`.
# Both create .venv (if missing), install torch first where none is present
# (so pip takes the 2.13.0 build instead of resolving a bare `torch`), then this project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install bytecode train test test-all compile-check-gpu-image lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when pyproject.toml changes (the stamp file records the last install).
STAMP := $(VENV)/.fusedce-installed

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(STAMP)

train: install
	$(BIN)/python train.py $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The kernel suite runs twice: through Triton's interpreter (the Triton kernel itself, on CPU)
# and through the torch backend's row contract (FUSEDCE_BACKEND=torch: small plain CPU calls
# would otherwise go to F.cross_entropy). Everything else runs once, on the default backend.
# `make test` leaves out the tests marked `slow`: each repeats, at a larger cost, a property
# that a test it runs already checks (docs/TESTING.md); `make test-all` runs them too.
# Each suite runs in WORKERS pytest-xdist processes of one compute thread each (tests/conftest.py);
# the rest of the suite keeps each test file in one worker (--dist loadfile): its module
# fixtures (a trained run, a process group) are built once. WORKERS=0 runs in this process.
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
SELECT ?= and not slow
WORKERS ?= 2

# Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE), this project's own
# modules, installed editable, would be compiled again in every process the suite starts (a
# train.py run, a gloo rank: ~0.6 s each, a few hundred of them); `bytecode` compiles them once
# (pip does it for the installed packages), and Python reads what is there.
bytecode: install
	$(BIN)/python -m compileall -q kernels lightning_modules datamodules benchmarks tests train.py

test: lint bytecode
	TRITON_INTERPRET=1 $(PYTEST) -n $(WORKERS) -m "kernel $(SELECT)"
	FUSEDCE_BACKEND=torch $(PYTEST) -n $(WORKERS) -m "kernel $(SELECT)"
	$(PYTEST) -n $(WORKERS) --dist loadfile -m "not kernel $(SELECT)"
	$(MAKE) compile-check-gpu-image

test-all:
	$(MAKE) test SELECT=

# The GPU image runs triton 3.6: compile every kernel for sm_90 with that release too (no GPU
# needed; the whole suite above used the installed triton).
GPU_IMAGE_TRITON ?= 3.6.0
TRITON_ALT := $(VENV)/triton-$(GPU_IMAGE_TRITON)

$(TRITON_ALT): | $(STAMP)
	$(BIN)/pip install -q --no-deps --target $@ "triton==$(GPU_IMAGE_TRITON)"

compile-check-gpu-image: $(TRITON_ALT)
	PYTHONPATH=$(TRITON_ALT) $(BIN)/python -c "import triton; print('compiling with triton', triton.__version__)"
	PYTHONPATH=$(TRITON_ALT) $(PYTEST) -n $(WORKERS) tests/test_compile_hopper.py tests/test_extras_compile_hopper.py tests/test_distill_compile_hopper.py

bench: install
	$(BIN)/python -m benchmarks.bench_cross_entropy $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

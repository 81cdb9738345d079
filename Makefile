# The two commands of the README:
#   make bench   set up (once) and benchmark every installed framework; results are kept in results/history/
#   make test    set up (once) and run the harness tests, the parity suite, and a short benchmark gated on accuracy
#                and against the committed baseline (results/baseline-smoke-cpu-epyc-3072.json)
# Pass benchmark options with ARGS, e.g.  make bench ARGS="--frameworks=pytorch,jax --epochs 3"

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Machines with an NVIDIA driver get the CUDA builds of every framework; others the CPU builds.
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRAS)
PIP_INDEX := $(if $(filter gpu,$(EXTRAS)),--extra-index-url https://download.pytorch.org/whl/cu126)
HISTORY := file://results/history
ARGS ?=

.PHONY: setup bench test

# The Rust row (burn) where cargo is present: its PyO3 extension, built in release mode into the same environment, with
# burn's CUDA backend (for CUDA 12.6, as the other frameworks) where they get their CUDA builds. cargo keeps its build
# in the user's cache (CARGO_TARGET_DIR): a rebuild, also from a fresh clone, compiles only what changed. Without cargo
# the row is skipped as "not installed", with the command that installs Rust.
BURN := implementations/rust_burn
BURN_STAMP := $(VENV)/.installed-burn-$(EXTRAS)
export CARGO_TARGET_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mnist-in-every-framework/cargo-target

# The Haskell row's program is (re)built on every set-up: cabal reuses an existing build.
setup: $(STAMP) $(if $(shell command -v cargo),$(BURN_STAMP))
	sh implementations/haskell/setup.sh

# Re-installs only when the packaging changes; an existing environment is reused.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(PIP_INDEX) --editable '.[$(EXTRAS),dev]'
	touch $@

$(BURN_STAMP): $(STAMP) $(BURN)/Cargo.toml $(BURN)/Cargo.lock $(BURN)/pyproject.toml $(BURN)/src/lib.rs
	$(if $(filter gpu,$(EXTRAS)),CUDARC_CUDA_VERSION=12060 MATURIN_PEP517_ARGS="--features cuda") \
	    $(PYTHON) -m pip install --quiet ./$(BURN)
	touch $@

bench: setup
	$(PYTHON) -m bench.data fetch $(if $(MNIST_DIR),--mnist-dir $(MNIST_DIR))
	$(PYTHON) -m pytest bench --benchmark-autosave --benchmark-storage=$(HISTORY) $(ARGS)

test: setup
	$(if $(shell command -v cabal),sh implementations/haskell/build.sh test)
	sh tests/setup-chromium.sh
	$(PYTHON) -m pytest tests
	PATH="$(abspath $(VENV))/bin:$$PATH" sh bench/smoke-gate.sh $(ARGS)

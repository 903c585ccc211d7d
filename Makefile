# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13 is what this project is developed and tested on; override for CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo demo-data test test-all lint clean-demo gpu-check gpu-plan

$(VENV)/.installed: setup.py requirements/base.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Tokenize the bundled sample (tokenizer committed in data/sample/) into an indexed dataset.
data/tiny/corpus_text_document.idx: $(VENV)/.installed data/sample/corpus.jsonl data/sample/tokenizer.json
	$(PY) tools/preprocess_data.py --input data/sample/corpus.jsonl --output-prefix data/tiny/corpus \
		--tokenizer-type HFTokenizer --vocab-file data/sample/tokenizer.json --workers 2

demo-data: data/tiny/corpus_text_document.idx

# Train the tiny Sep-Attention model end to end (~2.6M params, a few minutes on 2 CPU cores).
demo: demo-data
	$(PY) deepy.py train.py configs/tiny.yml

test: venv
	$(PY) -m pytest --durations=10

test-all: venv
	$(PY) -m pytest -m "" --durations=10

lint: venv
	$(VENV)/bin/ruff check .

# GPU day one (bench/gpu_day_one.py): every GPU path checked and timed in under 8 minutes on one H200;
# gpu_day_one.md / .json / .log land in GPU_OUT. gpu-plan needs no GPU: every command parses (CI runs it).
GPU_OUT ?= bench/out/gpu_day_one
gpu-check:
	bash bench/gpu_day_one.sh $(GPU_OUT)

gpu-plan:
	bash bench/gpu_day_one.sh --plan

clean-demo:
	rm -rf data/tiny checkpoints/tiny runs/tiny

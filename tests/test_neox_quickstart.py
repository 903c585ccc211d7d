"""GPT-NeoX's README command lines, end to end on CPU, with only the data paths changed: preprocess,
train, generate, eval, convert to HF. The configs are a tiny model in NeoX's dialect (JSON with
comments, NeoX's keys, modelled on NeoX's configs/125M.yml), NeoX's configs/text_generation.yml as
published, and a local_setup.yml with the paths."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE, TOKENIZER

pytestmark = pytest.mark.slow

MODEL_YML = """# tiny GPT-NeoX-style setup (NeoX's configs/125M.yml, scaled down)
{
   "pipe_parallel_size": 1,
   "model_parallel_size": 1,

   # model settings
   "num_layers": 2,
   "hidden_size": 64,
   "num_attention_heads": 4,
   "seq_length": 64,
   "max_position_embeddings": 64,
   "norm": "layernorm",
   "pos_emb": "rotary",
   "no_weight_tying": true,
   "gpt_j_residual": false,
   "output_layer_parallelism": "column",
   "scaled_upper_triang_masked_softmax_fusion": false,
   "bias_gelu_fusion": false,
   "rope_fusion": false,
   "layernorm_fusion": false,
   "init_method": "small_init",
   "output_layer_init_method": "wang_init",
   "attention": {"sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 16}},

   "optimizer": {
     "type": "Adam",
     "params": {
       "lr": 0.002,
       "betas": [0.9, 0.95],
       "eps": 1.0e-8,
     }
   },
   "min_lr": 0.0002,
   "train_micro_batch_size_per_gpu": 4,
   "data_impl": "mmap",
   "gradient_clipping": 1.0,
   "weight_decay": 0.1,
   "hidden_dropout": 0.0,
   "attention_dropout": 0.0,

   "train_iters": 20,
   "lr_decay_iters": 20,
   "distributed_backend": "nccl",
   "lr_decay_style": "cosine",
   "warmup": 0.01,
   "checkpoint_factor": 10,
   "eval_interval": 10,
   "eval_iters": 2,

   "log_interval": 5,
   "steps_per_print": 10,
   "keep_last_n_checkpoints": 4,
   "wall_clock_breakdown": true,
}
"""

TEXT_GENERATION_YML = """# Parameters used for text generation
# Make sure `load` is specified somewhere else
{
  # Text gen type: `input-file`, `unconditional` or `interactive`
  "text_gen_type": "unconditional",

  # Params for all
  "maximum_tokens": 102,
  "prompt_end": "\\n",
  "temperature": 1.0,
  "top_p": 0.0,
  "top_k": 0,
  "recompute": false,

  # `unconditional`: samples
  "num_samples": 10,

  # input/output file
  "sample_input_file": "{work}/sample_input.txt",
  "sample_output_file": "{work}/sample_output.txt",
}
"""

LOCAL_SETUP_YML = """{{
  "data_path": "{work}/data/mydataset_text_document",
  "vocab_file": "{tokenizer}",
  "tokenizer_type": "HFTokenizer",
  "save": "{work}/checkpoints",
  "load": "{work}/checkpoints",
  "log_dir": "{work}/logs",
}}
"""


def sh(*argv, timeout=600):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_neox_readme_quick_start(tmp_path):
    work = tmp_path
    (work / "data").mkdir()
    (work / "configs").mkdir()
    docs = (SAMPLE / "corpus.jsonl").read_text().splitlines(keepends=True)[:300]
    (work / "data" / "mydataset.jsonl").write_text("".join(docs))
    (work / "configs" / "tiny.yml").write_text(MODEL_YML)
    (work / "configs" / "text_generation.yml").write_text(TEXT_GENERATION_YML.replace("{work}", str(work)))
    (work / "configs" / "local_setup.yml").write_text(LOCAL_SETUP_YML.format(work=work, tokenizer=TOKENIZER))
    configs = str(work / "configs")

    # Datasets: "Using Custom Data"
    sh("tools/datasets/preprocess_data.py", "--input", f"{work}/data/mydataset.jsonl",
       "--output-prefix", f"{work}/data/mydataset", "--vocab", str(TOKENIZER), "--dataset-impl", "mmap",
       "--tokenizer-type", "HFTokenizer", "--append-eod")
    assert (work / "data" / "mydataset_text_document.idx").is_file()

    # Training and Finetuning
    train = sh("./deepy.py", "train.py", "-d", configs, "tiny.yml", "local_setup.yml")
    assert (work / "checkpoints" / "global_step20").is_dir(), train.stdout[-2000:]

    # Inference
    sh("./deepy.py", "generate.py", "-d", configs, "tiny.yml", "local_setup.yml", "text_generation.yml")
    samples = [json.loads(line) for line in (work / "sample_output.txt").read_text().splitlines()]
    assert len(samples) == 10 and all(0 <= s["length"] <= 102 and s["context"] == "" for s in samples)
    assert any(s["text"] for s in samples)

    # Evaluation (local task data built from held-out text: the data path)
    sh("tools/datasets/build_eval_tasks.py", "--input", str(SAMPLE / "corpus.jsonl"), "--out", f"{work}/eval",
       "--max-examples", "30")
    evaluated = sh("./deepy.py", "eval.py", "-d", configs, "tiny.yml", "local_setup.yml", "--eval_tasks",
                   "docs_lambada", "docs_cloze", "--task-data", f"{work}/eval", "--output-path",
                   f"{work}/eval_results.json")
    results = json.loads((work / "eval_results.json").read_text())["results"]
    assert {"docs_lambada", "docs_cloze"} <= set(results), evaluated.stdout[-2000:]

    # Exporting to Hugging Face
    sh("./tools/ckpts/convert_neox_to_hf.py", "--input_dir", f"{work}/checkpoints/global_step20",
       "--config_file", f"{configs}/tiny.yml", "--output_dir", f"{work}/hf_model", "--precision", "auto",
       "--architecture", "neox")
    config = json.loads((work / "hf_model" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["num_hidden_layers"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "hf_model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) > 0

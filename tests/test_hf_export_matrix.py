"""Every exportable family x tied/untied output layer x export kind, loaded by stock transformers in a
fresh process (tests/hf_fresh_process.py, our package not importable there).

Families: GPT-NeoX with parallel and with sequential residual, Llama with grouped-query attention,
GPT-2, Falcon (multi-query). Exports: plain (full attention, the stock class) and SepLLM (remote code,
``trust_remote_code=True``). For each: the logits equal ours (fp32, 1e-4 of the largest |logit|) and
transformers' load report lists no missing, unexpected or mismatched key -- an untied head that does
not load would otherwise be left at its random initialisation without any error.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, TOKENIZER, tiny_config_tree
from test_hf_common import randomize

from megatron.checkpointing import save_checkpoint
from megatron.config import config_from_tree, config_to_tree
from megatron.convert import export_hf
from megatron.model import build_model
from megatron.tokenizer import build_tokenizer

pytest.importorskip("transformers")

FAMILIES = {
    "neox_parallel": dict(gpt_j_residual=True),
    "neox_sequential": dict(gpt_j_residual=False),
    "llama_gqa": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2, gpt_j_residual=False, rotary_pct=1.0,
                      use_bias_in_attn_linear=False, use_bias_in_mlp=False),
    "gpt2": dict(pos_emb="learned", activation="gelu_tanh", gpt_j_residual=False, max_position_embeddings=64),
    "falcon": dict(rotary_pct=1.0, num_kv_heads=1, use_bias_in_attn_linear=False, use_bias_in_mlp=False),
}
ARCHITECTURES = {"neox_parallel": "GPTNeoXForCausalLM", "neox_sequential": "GPTNeoXForCausalLM",
                 "llama_gqa": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "falcon": "FalconForCausalLM"}
EXPORTS = {"plain": {"mode": "full"}, "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 6}}
CASES = list(itertools.product(FAMILIES, ("tied", "untied"), EXPORTS))
CACHE = dict(init_cache_size=2, sep_cache_size=4, local_size=8, cache_size=24)  # fits GPT-2's 64 positions
VOCAB = 4096  # the bundled sample tokenizer's; divisible by 8, so no padded rows


def quiet(_: str) -> None:
    pass


def export_case(root: Path, family: str, head: str, export: str, tokens: torch.Tensor) -> dict:
    """A random-weight model of this case saved as our checkpoint and exported; our logits of ``tokens``."""
    name = f"{family}_{head}_{export}"
    impl = "sdpa" if export == "plain" else "reference"
    tree = tiny_config_tree("unused", no_weight_tying=head == "untied",
                            attention={"impl": impl, "sepllm": EXPORTS[export]}, **FAMILIES[family])
    cfg = config_from_tree(tree)
    tokenizer = build_tokenizer("HFTokenizer", str(TOKENIZER), None)
    model = build_model(cfg, VOCAB, cfg.attention.sepllm.separator_ids_from(tokenizer), tokenizer.eod_id)
    randomize(model, seed=len(name))
    save_checkpoint(str(root / f"ckpt_{name}"), 1, model, None, {"consumed_samples": 0}, config_to_tree(cfg))
    out = root / f"hf_{name}"
    export_hf(str(root / f"ckpt_{name}"), str(out), cache=CACHE, progress=False, log=quiet)
    with torch.no_grad():
        logits = model.full_logits(tokens)[..., :VOCAB]
    return {"dir": out, "ours": logits}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_matrix")
    tokenizer = build_tokenizer("HFTokenizer", str(TOKENIZER), None)
    lines = (SAMPLE / "corpus.jsonl").read_text().splitlines()[:2]
    tokens = torch.tensor([tokenizer.encode(json.loads(line)["text"])[:24] for line in lines])
    cases = {case: export_case(root, *case, tokens) for case in CASES}
    jobs = [{"dir": str(item["dir"]), "tokens": tokens.tolist(), "remote": case[2] == "sepllm"}
            for case, item in cases.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(root / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-I", str(ROOT / "tests" / "hf_fresh_process.py"), str(root / "jobs.json"),
                          str(root / "results.pt")], capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = torch.load(root / "results.pt", weights_only=False)
    assert results["__megatron_imported__"] is False
    return {case: {**item, "result": results[str(item["dir"])]} for case, item in cases.items()}


@pytest.mark.parametrize("family,head,export", CASES)
def test_export_loads_completely_and_computes_our_logits(matrix, family, head, export):
    item = matrix[(family, head, export)]
    result = item["result"]
    config = json.loads((item["dir"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is (head == "tied")
    expected_class = ARCHITECTURES[family] if export == "plain" else f"SepLLM{ARCHITECTURES[family]}"
    assert result["class"] == expected_class
    report = result["load_report"]
    assert report == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}, report
    ours = item["ours"]
    scale = ours.abs().max().item()
    torch.testing.assert_close(result["logits"], ours, atol=1e-4 * scale, rtol=0)

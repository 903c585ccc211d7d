"""SepLLM exports in stock transformers, checked in a fresh process that cannot import our package.

Per family (GPT-NeoX, Llama with GQA and a per-layer window, GPT-2, Falcon multi-query with a
full-attention layer 0) a tiny model is trained a few steps with Sep-Attention through our Trainer and
exported; StreamingLLM, FixLLM (fixed interval) and separate-documents variants are exported from
random weights. One child process (tests/hf_fresh_process.py, ``python -I`` with imports of
``megatron`` blocked) loads every export with ``trust_remote_code`` and reports logits, greedy tokens
and cache sizes; here they are compared with our model, our streaming engine (what tools/generate.py
runs) and ``enable_sepllm`` on the stock model.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, TOKENIZER, run_cli, tiny_config_tree
from test_hf_common import VOCAB, safetensors_state, save_hf, tiny_llama, transformers

from megatron.checkpointing import read_manifest, resolve_checkpoint_dir, save_checkpoint
from megatron.checkpointing.integrity import signed_json
from megatron.config import config_from_tree, config_to_tree
from megatron.convert import export_hf, import_hf
from megatron.inference import CacheConfig, StreamingEngine
from megatron.inference.generation import generate_tokens
from megatron.inference.loading import load_model
from megatron.inference.sampling import SamplingConfig
from megatron.model import build_model
from megatron.tokenizer import build_tokenizer

RULE = {"mode": "sepllm", "n_init": 2, "n_local": 8}
FAMILIES = {
    "neox": {},  # rotary on half the head, parallel residual, layernorm + gelu
    "llama": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2, gpt_j_residual=False, rotary_pct=1.0,
                  use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                  attention={"impl": "compact", "sepllm": {**RULE, "layer_n_local": {1: 4}}}),
    "gpt2": dict(pos_emb="learned", activation="gelu_tanh", gpt_j_residual=False, max_position_embeddings=64),
    "falcon": dict(rotary_pct=1.0, num_kv_heads=1, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                   attention={"impl": "compact", "sepllm": {**RULE, "full_attention_layers": [0]}}),
}
ARCHITECTURES = {"neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "falcon": "FalconForCausalLM"}
VARIANTS = {"streamingllm": {"mode": "streamingllm", "n_init": 2, "n_local": 8},
            "fixed_interval": {"mode": "fixed_interval", "n_init": 2, "n_local": 6, "interval": 3},
            "separate_documents": {**RULE, "separate_documents": True}}
CACHE = dict(init_cache_size=2, sep_cache_size=4, local_size=8, cache_size=24)  # 10 new tokens per forward
NEW_TOKENS = 40
IMPORTED_SEPS = [3, 7, 11]
README_TEXT = "The module"


def quiet(_: str) -> None:
    pass


def sample_tokens(tokenizer, rows: int = 2, length: int = 32):
    lines = (SAMPLE / "corpus.jsonl").read_text().splitlines()
    ids = [tokenizer.encode(json.loads(line)["text"])[:length] for line in lines[:rows]]
    return ids


def train_and_export(name: str, data: str, root: Path) -> dict:
    kw = dict(FAMILIES[name])
    kw.setdefault("attention", {"impl": "compact", "sepllm": RULE})
    save = root / f"ckpt_{name}"
    tree = tiny_config_tree(data, train_iters=4, save=str(save), checkpoint_factor=0, **kw)
    from megatron.training.trainer import Trainer
    Trainer(config_from_tree(tree), log=quiet).train()
    out = root / f"hf_{name}"
    export_hf(str(save), str(out), cache=CACHE, progress=False, log=quiet)
    return {"ckpt": save, "dir": out}


def random_export(name: str, rule: dict, root: Path, tokenizer) -> dict:
    cfg = config_from_tree(tiny_config_tree("unused", attention={"impl": "reference", "sepllm": rule}))
    seps = tokenizer.separator_ids(cfg.attention.sepllm.separator_tokens, True)
    torch.manual_seed(3)
    model = build_model(cfg, 4096, seps, tokenizer.eod_id)
    save = root / f"ckpt_{name}"
    save_checkpoint(str(save), 1, model, None, {"consumed_samples": 0}, config_to_tree(cfg))
    out = root / f"hf_{name}"
    export_hf(str(save), str(out), cache=CACHE, progress=False, log=quiet)
    return {"ckpt": save, "dir": out}


def imported_sepllm_export(root: Path) -> dict:
    """A stock Llama imported, switched to Sep-Attention (as a fine-tune overlay would) and exported."""
    hf_dir = save_hf(tiny_llama(), root / "stock_llama")
    import_hf(str(hf_dir), str(root / "ckpt_imported"), seq_length=32, divisible_by=64, progress=False, log=quiet)
    manifest_path = resolve_checkpoint_dir(str(root / "ckpt_imported")) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["attention"]["sepllm"].update(mode="sepllm", n_init=2, n_local=4, separator_ids=IMPORTED_SEPS,
                                                     full_attention_layers=[-1])
    manifest_path.write_text(signed_json(manifest))  # manifests carry their own checksum
    out = root / "hf_imported"
    export_hf(str(root / "ckpt_imported"), str(out), progress=False, log=quiet)
    return {"ckpt": root / "ckpt_imported", "dir": out, "stock": hf_dir}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("HFTokenizer", str(TOKENIZER), None)


@pytest.fixture(scope="module")
def exports(tiny_dataset, tmp_path_factory, tokenizer):
    """Every export, plus what the fresh process reported for it."""
    root = tmp_path_factory.mktemp("hf_sepllm")
    found = {name: train_and_export(name, tiny_dataset, root) for name in FAMILIES}
    found.update({name: random_export(name, rule, root, tokenizer) for name, rule in VARIANTS.items()})
    found["imported"] = imported_sepllm_export(root)
    tokens = sample_tokens(tokenizer)
    tokens[1][10] = tokenizer.eod_id  # two documents in row 1 (for separate_documents)
    prompt = tokens[0][:14]  # longer than one forward may append: prefilled in two chunks
    jobs = []
    for name, item in found.items():
        job_tokens = [[t % VOCAB for t in row] for row in tokens] if name == "imported" else tokens
        item.update(tokens=job_tokens, prompt=prompt)
        generate = name in FAMILIES or name == "streamingllm"
        jobs.append({"dir": str(item["dir"]), "tokens": job_tokens, "prompt": prompt,
                     "new_tokens": NEW_TOKENS if generate else 0, "plain": name == "neox",
                     "readme": README_TEXT if name == "neox" else None})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(root / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-I", str(ROOT / "tests" / "hf_fresh_process.py"), str(root / "jobs.json"),
                          str(root / "results.pt")], capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = torch.load(root / "results.pt", weights_only=False)
    assert results["__megatron_imported__"] is False
    assert not any(str(ROOT) == p or str(ROOT / "tests") == p for p in results["__sys_path__"])
    for name, item in found.items():
        item["result"] = results[str(item["dir"])]
    return found


def our_model(item, tokenizer):
    model, cfg, _ = load_model(str(item["ckpt"]), tokenizer)
    return model, cfg


@pytest.mark.parametrize("name", [*FAMILIES, *VARIANTS])
def test_export_computes_our_sep_attention_in_stock_transformers(exports, tokenizer, name):
    item = exports[name]
    config = json.loads((item["dir"] / "config.json").read_text())
    family = next((f for f in FAMILIES if f == name), "neox")
    assert config["architectures"] == [ARCHITECTURES[family]]
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_sepllm.SepLLM{ARCHITECTURES[family]}"}
    assert item["result"]["class"] == f"SepLLM{ARCHITECTURES[family]}"
    assert item["result"]["module"].startswith("transformers_modules.")
    assert item["result"]["load_report"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                             "error_msgs": []}
    model, _ = our_model(item, tokenizer)
    with torch.no_grad():
        ours = model.full_logits(torch.tensor(item["tokens"]))[..., :config["vocab_size"]]
    torch.testing.assert_close(item["result"]["logits"], ours, atol=1e-4, rtol=0)


def test_without_remote_code_the_export_is_the_plain_architecture(exports, tokenizer):
    """Loaded without trust_remote_code an export is the stock class: full causal attention."""
    item = exports["neox"]
    result = item["result"]
    assert result["plain_class"] == "GPTNeoXForCausalLM"
    assert (result["plain_logits"] - result["logits"]).abs().max() > 1e-2  # Sep-Attention matters here
    model, cfg = our_model(item, tokenizer)
    tree = config_to_tree(cfg)
    tree["attention"] = {"impl": "sdpa", "sepllm": {"mode": "full"}}
    full = build_model(config_from_tree(tree), model.vocab_size)
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = full.eval().full_logits(torch.tensor(item["tokens"]))[..., :result["logits"].shape[-1]]
    torch.testing.assert_close(result["plain_logits"], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [*FAMILIES, "streamingllm"])
def test_greedy_generation_equals_our_streaming_engine_with_a_bounded_cache(exports, tokenizer, name):
    item = exports[name]
    result = item["result"]
    budget = json.loads((item["dir"] / "config.json").read_text())["sepllm"]["cache"]
    model, _ = our_model(item, tokenizer)
    engine = StreamingEngine(model, CacheConfig(**budget))
    ours = list(generate_tokens(engine, item["prompt"], NEW_TOKENS, SamplingConfig(greedy=True, vocab_limit=4096)))
    assert result["greedy_default"] == ours
    assert result["greedy_cache"] == ours
    assert result["kept_token_ids"] == engine.cache.kept_token_ids()  # the same entries survived eviction
    assert len(result["cache_lengths"]) == NEW_TOKENS
    assert max(result["cache_lengths"]) <= budget["cache_size"] == CACHE["cache_size"]
    if budget["policy"] == "sepllm":
        assert result["compressions"] == engine.cache.compressions > 2


def test_readme_example_generates_what_tools_generate_does(exports, tokenizer):
    """AutoTokenizer + generate(**inputs) with the export's defaults: stops at the end-of-text token."""
    item = exports["neox"]
    result = item["result"]
    assert result["readme_prompt"] == tokenizer.encode(README_TEXT)
    budget = json.loads((item["dir"] / "config.json").read_text())["sepllm"]["cache"]
    model, _ = our_model(item, tokenizer)
    ours = list(generate_tokens(StreamingEngine(model, CacheConfig(**budget)), result["readme_prompt"], NEW_TOKENS,
                                SamplingConfig(greedy=True, vocab_limit=4096), stop_ids=(tokenizer.eod_id,)))
    assert result["readme_generated"] == result["readme_prompt"] + ours


def test_tools_generate_prints_the_same_text(exports, tokenizer):
    item = exports["neox"]
    res = run_cli(["tools/generate.py", "--load", str(item["ckpt"]), "--prompt", tokenizer.decode(item["prompt"]),
                   "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--no-stop",
                   *(f"--{k.replace('_', '-')}={v}" for k, v in CACHE.items())])
    assert res.returncode == 0, res.stderr
    assert tokenizer.encode(tokenizer.decode(item["prompt"])) == item["prompt"]
    assert res.stdout == tokenizer.decode(item["result"]["greedy_default"]) + "\n"


def test_enable_sepllm_on_the_stock_model_equals_import_then_export(exports):
    from megatron.hf_remote import enable_sepllm
    item = exports["imported"]
    stock = transformers.AutoModelForCausalLM.from_pretrained(item["stock"], dtype=torch.float32).eval()
    enable_sepllm(stock, n_init=2, n_local=4, separator_ids=IMPORTED_SEPS, full_attention_layers=[-1])
    with torch.no_grad():
        logits = stock(torch.tensor(item["tokens"])).logits
    torch.testing.assert_close(logits, item["result"]["logits"], atol=1e-5, rtol=0)


def test_exported_code_needs_only_torch_and_transformers(exports):
    out = exports["neox"]["dir"]
    assert (out / "sepllm_rule.py").read_bytes() == (ROOT / "megatron" / "attention" / "sepllm_rule.py").read_bytes()
    stdlib = {"__future__", "dataclasses", "functools", "importlib", "inspect", "typing"}
    for path in sorted(out.glob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops.add(node.module.split(".")[0])
        assert tops <= stdlib | {"torch", "transformers"}, (path.name, tops)


def test_import_export_import_keeps_weights_and_rule(exports, tmp_path):
    item = exports["falcon"]
    import_hf(str(item["dir"]), str(tmp_path / "again"), seq_length=32, divisible_by=8, progress=False, log=quiet)
    first, second = (read_manifest(resolve_checkpoint_dir(str(p))) for p in (item["ckpt"], tmp_path / "again"))
    exported_ids = json.loads((item["dir"] / "config.json").read_text())["sepllm"]["separator_ids"]
    rule = first["config"]["attention"]["sepllm"]
    assert rule["separator_ids"] is None and rule["full_attention_layers"] == [0]  # ids came from the tokenizer
    assert second["config"]["attention"]["sepllm"] == {**rule, "separator_ids": exported_ids}
    a = torch.load(resolve_checkpoint_dir(str(item["ckpt"])) / "model_tp00_pp00.pt", weights_only=True)
    b = torch.load(resolve_checkpoint_dir(str(tmp_path / "again")) / "model_tp00_pp00.pt", weights_only=True)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    export_hf(str(tmp_path / "again"), str(tmp_path / "out2"), cache=CACHE, progress=False, log=quiet)
    x, y = safetensors_state(item["dir"]), safetensors_state(tmp_path / "out2")
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)

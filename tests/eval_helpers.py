"""Shared pieces of the evaluation tests: tiny random checkpoints with the bundled tokenizer, and the
local task data built from the bundled sample."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
from conftest import ROOT, SAMPLE, TOKENIZER, run_cli

from megatron.checkpointing import save_checkpoint
from megatron.config import config_from_tree, config_to_tree
from megatron.inference.loading import separator_ids_for
from megatron.model import GPTModel, build_model
from megatron.tokenizer import build_tokenizer

VOCAB = 4096  # the bundled tokenizer's size: with make_vocab_size_divisible_by 64 the embedding is unpadded


def eval_model_tree(mode: str = "sepllm", **overrides) -> dict:
    """A 2-layer model; a large init std makes next-token distributions peaked (clear winners, so
    accuracies cannot flip on rounding)."""
    tree = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64, rotary_pct=0.5,
                make_vocab_size_divisible_by=64, init_method_std=0.3, tokenizer_type="HFTokenizer",
                vocab_file=str(TOKENIZER), attention={"impl": "reference", "sepllm": {"mode": mode, "n_init": 2,
                                                                                       "n_local": 8}})
    return merged(tree, overrides)


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_model(tree: dict, seed: int = 0) -> GPTModel:
    cfg = config_from_tree({**tree, "seed": seed})
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    return build_model(cfg, VOCAB, separator_ids_for(cfg, tok), eod_id=tok.eod_id).eval()


def save_tiny_checkpoint(root: Path, tree: Optional[dict] = None, seed: int = 0) -> Path:
    """A random model saved as a checkpoint under ``root`` (a save root, 'latest' -> global_step1)."""
    tree = tree or eval_model_tree()
    model = make_model(tree, seed)
    save_checkpoint(str(root), 1, model, None, {}, config_to_tree(config_from_tree({**tree, "seed": seed})))
    return root


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval_ckpt") / "save")


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """docs_*.jsonl built from the bundled sample (30 examples per task)."""
    out = tmp_path_factory.mktemp("eval_tasks")
    proc = run_cli(["tools/datasets/build_eval_tasks.py", "--input", str(SAMPLE / "corpus.jsonl"), "--out", str(out),
                    "--max-examples", "30", "--ppl-chars", "1500"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


__all__ = ["ROOT", "VOCAB", "eval_model_tree", "make_model", "save_tiny_checkpoint", "eval_checkpoint", "task_data"]

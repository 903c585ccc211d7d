"""Collect every problem of a config and report them together, and suggest keys only where likely right.

A config check appends to :class:`Problems` instead of raising, so one run reports every unknown key,
every wrong type and every unsupported feature. One problem is one line (``file:line: message``); a
report with several starts with a count line. :func:`suggest` looks in a curated alias table of
GPT-NeoX / SepLLM / Megatron / Hugging Face spellings first, then accepts only close spellings
(edit distance within a quarter of the key's length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from megatron.errors import ConfigError

UNKNOWN_ORDER = (1 << 30, 0)


@dataclass(order=True)
class Problem:
    order: Tuple[int, int]  # (file index, line): problems are reported in file order
    text: str = field(compare=True)


class Problems:
    """An ordered, de-duplicated list of one-line problems."""

    def __init__(self) -> None:
        self.items: List[Problem] = []

    def add(self, where: str, message: str, order: Tuple[int, int] = UNKNOWN_ORDER) -> None:
        text = f"{where}: {message}"
        if all(p.text != text for p in self.items):
            self.items.append(Problem(order, text))

    def __bool__(self) -> bool:
        return bool(self.items)

    def lines(self) -> List[str]:
        return [p.text for p in sorted(self.items)]

    def raise_if_any(self) -> None:
        lines = self.lines()
        if len(lines) == 1:
            raise ConfigError(lines[0])
        if lines:
            raise ConfigError(f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines))


# Spellings from other stacks that mean one of our keys. Checked before any distance match.
ALIASES: Dict[str, str] = {
    "lr": "optimizer.params.lr", "learning_rate": "optimizer.params.lr", "max_lr": "optimizer.params.lr",
    "betas": "optimizer.params.betas", "adam_beta1": "optimizer.params.betas",
    "adam_beta2": "optimizer.params.betas", "adam_eps": "optimizer.params.eps",
    "optimizer_type": "optimizer.type",
    "batch_size": "train_micro_batch_size_per_gpu", "micro_batch_size": "train_micro_batch_size_per_gpu",
    "global_batch_size": "train_batch_size",
    "grad_accum_steps": "gradient_accumulation_steps", "accumulate_grad_batches": "gradient_accumulation_steps",
    "n_layer": "num_layers", "n_layers": "num_layers", "num_hidden_layers": "num_layers",
    "n_head": "num_attention_heads", "n_heads": "num_attention_heads", "num_heads": "num_attention_heads",
    "num_key_value_heads": "num_kv_heads", "n_kv_heads": "num_kv_heads",
    "n_embd": "hidden_size", "d_model": "hidden_size", "dim": "hidden_size",
    "ffn_dim": "intermediate_size", "n_inner": "intermediate_size",
    "seq_len": "seq_length", "max_seq_len": "seq_length", "context_length": "seq_length",
    "block_size": "seq_length", "n_positions": "max_position_embeddings",
    "layer_norm_eps": "layernorm_epsilon", "layer_norm_epsilon": "layernorm_epsilon",
    "rms_norm_eps": "rms_norm_epsilon", "rope_theta": "rotary_emb_base", "rotary_base": "rotary_emb_base",
    "partial_rotary_factor": "rotary_pct", "tie_word_embeddings": "no_weight_tying",
    "hidden_act": "activation", "initializer_range": "init_method_std",
    "tensor_model_parallel_size": "model_parallel_size", "tensor_parallel_size": "model_parallel_size",
    "tp": "model_parallel_size", "pipeline_model_parallel_size": "pipe_parallel_size",
    "pipeline_parallel_size": "pipe_parallel_size", "pp": "pipe_parallel_size",
    "zero_stage": "zero_optimization.stage", "grad_clip": "clip_grad", "max_grad_norm": "clip_grad",
    "lr_warmup_iters": "warmup_iters", "warmup_steps": "warmup_iters", "lr_warmup_fraction": "warmup",
    "warmup_ratio": "warmup", "min_learning_rate": "min_lr", "max_steps": "train_iters",
    "max_iters": "train_iters", "train_steps": "train_iters", "save_dir": "save", "load_dir": "load",
    "checkpoint_interval": "checkpoint_factor", "wandb_team": "wandb_entity",
    "n_local": "attention.sepllm.n_local", "n_init": "attention.sepllm.n_init", "mode": "attention.sepllm.mode",
    "impl": "attention.impl", "separator_ids": "attention.sepllm.separator_ids",
    "local_window": "attention.sepllm.n_local", "window_size": "attention.sepllm.n_local",
    "full_attention_layers": "attention.sepllm.full_attention_layers",
    "sepllm": "attention.sepllm", "peak_flops": "peak_theoretical_tflops",
}


def edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (adjacent transpositions count one edit)."""
    prev2: List[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def closest(key: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate within ``max(1, len(key) // 4)`` edits (case-insensitive), if exactly one is nearest."""
    limit = max(1, len(key) // 4)
    scored = sorted((edit_distance(key.lower(), c.lower()), c) for c in set(candidates))
    if not scored or scored[0][0] > limit:
        return None
    if len(scored) > 1 and scored[1][0] == scored[0][0]:
        return None  # ambiguous: no hint beats a wrong one
    return scored[0][1]


def suggest(key: str, candidates: Iterable[str], aliases: bool = True) -> str:
    """``"; did you mean 'x'?"`` or ``""``."""
    if aliases and key in ALIASES:
        return f"; did you mean '{ALIASES[key]}'?"
    close = closest(key, candidates)
    return f"; did you mean '{close}'?" if close else ""

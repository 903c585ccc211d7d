"""Sep-Attention: the rule (sepllm_rule.py), what each kernel can do (impls.py, torch-free) and the
kernels that implement it, chosen by ``attend``.

The package's names load on first use, so ``megatron.attention.impls`` imports without torch (the
config check reads it before any process starts)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "IMPLS": "megatron.attention.impls",
    "attend": "megatron.attention.dispatch",
    "compact_attention": "megatron.attention.compact",
    **{name: "megatron.attention.sepllm_rule" for name in (
        "SepRule", "dense_mask", "document_ids", "kv_kept_fraction", "kv_kept_per_query", "resolve_layer_rules",
        "separator_flags")},
}

if TYPE_CHECKING:  # for readers and type checkers; at run time __getattr__ loads them
    from megatron.attention.compact import compact_attention
    from megatron.attention.dispatch import attend
    from megatron.attention.impls import IMPLS
    from megatron.attention.sepllm_rule import (
        SepRule,
        dense_mask,
        document_ids,
        kv_kept_fraction,
        kv_kept_per_query,
        resolve_layer_rules,
        separator_flags,
    )

__all__ = ["IMPLS", "attend", "compact_attention", "SepRule", "dense_mask", "document_ids", "kv_kept_fraction",
           "kv_kept_per_query", "resolve_layer_rules", "separator_flags"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron.attention' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

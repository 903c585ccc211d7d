"""Chooses the attention implementation. All take q [B, Hq, L, D], k/v [B, Hkv, L, D]."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.attention.reference import expand_kv_heads, reference_attention
from megatron.attention.sepllm_rule import SepRule, dense_mask

IMPLS = ("auto", "reference", "sdpa", "flash")


def dense_causal_attention(q, k, v, rule: SepRule, doc_ids=None, scale=None):
    """Plain causal attention (full layers, and the dense baseline)."""
    k = expand_kv_heads(k, q.shape[1])
    v = expand_kv_heads(v, q.shape[1])
    if rule.separate_documents and doc_ids is not None:
        mask = dense_mask(torch.ones_like(doc_ids, dtype=torch.bool), rule, doc_ids)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor, rule: SepRule,
           doc_ids: Optional[torch.Tensor] = None, impl: str = "auto",
           scale: Optional[float] = None) -> torch.Tensor:
    if impl == "sdpa" or rule.is_full:
        # impl 'sdpa' means dense causal attention regardless of the rule (the baseline).
        return dense_causal_attention(q, k, v, rule, doc_ids, scale)
    if impl in ("reference", "auto"):
        return reference_attention(q, k, v, is_sep, rule, doc_ids, scale)
    raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")

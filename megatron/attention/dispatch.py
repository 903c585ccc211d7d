"""Chooses the attention implementation. All take q [B, Hq, L, D], k/v [B, Hkv, L, D].

impls:
  * ``reference`` -- dense L x L mask from the rule + SDPA (slow, obviously right);
  * ``compact``   -- Sep-Attention over the compact layout, fused CPU kernel, fwd + bwd (CPU);
  * ``flex``      -- FlexAttention over the compact layout (compiled to Triton on CUDA);
  * ``sdpa``      -- dense causal attention, ignoring the rule (the baseline);
  * ``flash``     -- dense causal attention through ``flash_attn`` (the GPU baseline);
  * ``auto``      -- ``flex`` on CUDA, ``compact`` elsewhere.
Layers whose rule is ``full`` always run dense causal attention. Every impl takes an optional ALiBi
bias (``alibi.py``): an additive float mask for reference / sdpa / compact, a ``score_mod`` for flex,
``alibi_slopes`` for flash (token-level ALiBi only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.attention.alibi import AlibiBias, additive_mask
from megatron.attention.reference import expand_kv_heads, reference_attention
from megatron.attention.sepllm_rule import SepRule, dense_mask

IMPLS = ("auto", "reference", "compact", "flex", "sdpa", "flash")


def dense_causal_attention(q, k, v, rule: SepRule, doc_ids=None, scale=None, bias: Optional[AlibiBias] = None):
    """Plain causal attention (full layers, and the dense baseline); ``bias`` adds ALiBi."""
    separate = rule.separate_documents and doc_ids is not None
    if separate or bias is not None:
        k = expand_kv_heads(k, q.shape[1])
        v = expand_kv_heads(v, q.shape[1])
        flags = torch.ones(q.shape[0] if separate else 1, q.shape[2], dtype=torch.bool, device=q.device)
        keep = dense_mask(flags, rule, doc_ids if separate else None)[:, None]
        mask = keep if bias is None else additive_mask(keep, bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def flash_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rule: SepRule,
                           doc_ids: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """Dense causal attention via flash_attn (GQA native). A baseline: ignores the Sep rule. Token-level
    ALiBi goes to flash_attn's ``alibi_slopes``; ALiBi-BiPE is rejected before launch (validation)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError("attention.impl='flash' needs the flash_attn package (CUDA only); "
                           "use 'sdpa' for the dense baseline or 'flex' for Sep-Attention") from err
    if rule.separate_documents and doc_ids is not None:
        raise NotImplementedError("impl 'flash' does not implement separate_documents; use 'sdpa'")
    if bias is not None and bias.positions is not None:
        raise NotImplementedError("impl 'flash' cannot run ALiBi-BiPE (segment-level bias); use 'flex' or 'sdpa'")
    slopes = None if bias is None else bias.slopes.to(device=q.device, dtype=torch.float32)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          softmax_scale=scale, causal=True, alibi_slopes=slopes)
    return out.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor, rule: SepRule,
           doc_ids: Optional[torch.Tensor] = None, impl: str = "auto",
           scale: Optional[float] = None, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """``bias``: ALiBi / ALiBi-BiPE (``megatron/attention/alibi.py``), added to the scores by every impl."""
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "flash":
        return flash_causal_attention(q, k, v, rule, doc_ids, scale, bias)
    if impl == "sdpa" or rule.is_full:
        # impl 'sdpa' means dense causal attention regardless of the rule (the baseline).
        return dense_causal_attention(q, k, v, rule, doc_ids, scale, bias)
    if impl == "auto":
        impl = "flex" if q.is_cuda else "compact"
    if impl == "reference":
        return reference_attention(q, k, v, is_sep, rule, doc_ids, scale, bias)
    if impl == "compact":
        from megatron.attention.compact import compact_attention
        return compact_attention(q, k, v, is_sep, rule, doc_ids, scale, bias=bias)
    # impl == "flex": FlexAttention compiles the compact Sep-Attention layout to Triton on CUDA.
    from megatron.attention.flex import flex_sep_attention
    return flex_sep_attention(q, k, v, is_sep, rule, doc_ids, scale, bias=bias)

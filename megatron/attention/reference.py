"""Reference Sep-Attention: the dense boolean mask from the rule + SDPA. Slow, obviously right."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.attention.alibi import AlibiBias, additive_mask
from megatron.attention.sepllm_rule import SepRule, dense_mask


def expand_kv_heads(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat GQA key/value heads [B, Hkv, L, D] to [B, Hq, L, D]."""
    groups = num_q_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                        rule: SepRule, doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        dropout_p: float = 0.0, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """q [B, Hq, L, D], k/v [B, Hkv, L, D], is_sep [B, L] -> [B, Hq, L, D]; ``dropout_p`` drops
    attention probabilities (training); ``bias``: ALiBi."""
    mask = dense_mask(is_sep, rule, doc_ids)[:, None]  # [B, 1, L, L]
    if bias is not None:
        mask = additive_mask(mask, bias, q.dtype)
    k = expand_kv_heads(k, q.shape[1])
    v = expand_kv_heads(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)

"""The attention of one forward: every layer hands its new q/k/v to one backend object.

A backend gets a layer's unrotated q [B, L, Hq, D] and k/v [B, L, Hkv, D] and returns the attention
output [B, L, Hq, D]; it owns the positions (rotary), the kernel and whatever else the layer's
attention needs. There are three:

* :class:`LocalAttention` (here): the whole sequence is on this rank -- rotary, then ``dispatch.attend``;
* ``parallel/context_parallel.py: ContextParallelAttention``: this rank holds a chunk of the sequence
  and exchanges keys/values with the other context-parallel ranks;
* ``inference/engine.py``: streaming generation's bounded KV cache.

The model builds the backend once per forward (``GPTModel.attention_inputs``); the layer forward
does not know which one it got.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch

from megatron.attention.alibi import AlibiBias
from megatron.attention.dispatch import attend
from megatron.attention.sepllm_rule import SepRule
from megatron.kernels import apply_rotary_qk


class AttentionBackend(Protocol):
    def attend(self, layer: int, rule: SepRule, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Rotary:
    """How the model rotates q/k: the first ``dim`` channels of each head (0: no rotary)."""

    dim: int = 0
    interleaved: bool = False
    fused: Optional[bool] = None


@dataclass
class LocalAttention:
    """Attention over the sequence this rank holds, with the per-forward tables computed once."""

    is_sep: Optional[torch.Tensor]  # [B, L] bool, per the base SepLLM mode
    doc_ids: Optional[torch.Tensor]  # [B, L] or None
    cos: Optional[torch.Tensor]  # [B|1, L, rotary_dim // 2]
    sin: Optional[torch.Tensor]
    alibi: Optional[AlibiBias] = None  # this rank's slopes (and BiPE segment positions)
    impl: str = "auto"
    dropout_p: float = 0.0  # attention dropout of this forward (0 at evaluation)
    rotary: Rotary = Rotary()

    def heads_first(self, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q, k and v, as [B, H, L, D] for the kernels."""
        if self.rotary.dim:
            q, k = apply_rotary_qk(q, k, self.cos, self.sin, self.rotary.dim, self.rotary.interleaved,
                                   fused=self.rotary.fused)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, layer: int, rule: SepRule, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_first(q, k, v)
        out = attend(q, k, v, self.is_sep, rule, self.doc_ids, impl=self.impl, dropout_p=self.dropout_p,
                     bias=self.alibi)
        return out.transpose(1, 2)

"""Fused kernels (Triton on GPU) behind one API, with eager fallbacks that run anywhere.

Every op takes ``fused``: None = auto (the Triton kernel when the tensor is on CUDA and Triton
imports, else eager), True = the Triton kernel or a clear error (on a CPU tensor only with
``TRITON_INTERPRET=1``, Triton's interpreter), False = eager. Triton is imported lazily, on the first
fused call, so a CPU install never needs it. See ``megatron/kernels/dispatch.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from megatron.kernels import eager
from megatron.kernels.dispatch import use_fused, use_fused_norm

__all__ = ["apply_rotary_qk", "layer_norm", "rms_norm", "fused_cross_entropy"]

NormOut = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                    interleaved: bool = False, *, fused: Optional[bool] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary on the first ``rotary_dim`` channels of q [B, L, Hq, D] and k [B, L, Hk, D].

    cos/sin [B|1, L, rotary_dim // 2] (fp32) carry the positions; ``interleaved`` picks GPT-J pairs
    (0,1),(2,3).. over GPT-NeoX halves (j, j + rotary_dim/2). No gradient flows to cos/sin.
    """
    if use_fused(q, fused, "apply_rotary_qk"):
        from megatron.kernels.triton_rope import rotary_qk
        return rotary_qk(q, k, cos, sin, rotary_dim, interleaved)
    return eager.apply_rotary_qk(q, k, cos, sin, rotary_dim, interleaved)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               residual: Optional[torch.Tensor] = None, *, fused: Optional[bool] = None) -> NormOut:
    """LayerNorm over the last dim in fp32, output in x's dtype.

    With ``residual``: returns (layer_norm(x + residual), x + residual). Auto mode uses eager for
    rows wider than ``dispatch.NORM_MAX_FUSED_COLUMNS``.
    """
    if use_fused_norm(x, fused, "layer_norm"):
        from megatron.kernels.triton_norm import norm
        return norm(x, weight, bias, eps, residual, rms=False)
    return eager.layer_norm(x, weight, bias, eps, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None, *,
             fused: Optional[bool] = None) -> NormOut:
    """RMSNorm over the last dim in fp32, output in x's dtype; with ``residual`` as for layer_norm."""
    if use_fused_norm(x, fused, "rms_norm"):
        from megatron.kernels.triton_norm import norm
        return norm(x, weight, None, eps, residual, rms=True)
    return eager.rms_norm(x, weight, eps, residual)


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                        fused: Optional[bool] = None) -> torch.Tensor:
    """Per-token cross-entropy [N] (fp32; 0 at ``ignore_index``) of logits [N, V].

    The fused kernel streams each row through an online logsumexp, so no fp32 copy of the logits is
    ever made; its backward writes d(logits) in the logits' dtype.
    """
    if use_fused(logits, fused, "fused_cross_entropy"):
        from megatron.kernels.triton_cross_entropy import cross_entropy
        return cross_entropy(logits, targets, ignore_index)
    return eager.cross_entropy(logits, targets, ignore_index)

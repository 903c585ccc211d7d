"""Eager (pure PyTorch) implementations: the CPU fallback and the semantics the fused kernels match."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
           interleaved: bool) -> torch.Tensor:
    """Rotary on the first ``rotary_dim`` channels of x [B, L, H, D]; cos/sin [B|1, L, rotary_dim//2]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    cos = cos[:, :, None, :].to(torch.float32)
    sin = sin[:, :, None, :].to(torch.float32)
    r = rot.to(torch.float32)
    if interleaved:  # GPT-J: pairs (0,1), (2,3), ...
        x1, x2 = r[..., 0::2], r[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama: halves (0, d/2), (1, d/2+1), ...
        half = rotary_dim // 2
        x1, x2 = r[..., :half], r[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def apply_rotary_qk(q, k, cos, sin, rotary_dim: int, interleaved: bool = False):
    return rotate(q, cos, sin, rotary_dim, interleaved), rotate(k, cos, sin, rotary_dim, interleaved)


def layer_norm(x, weight, bias, eps: float, residual: Optional[torch.Tensor] = None):
    if residual is not None:
        x = x + residual
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(),
                       eps).to(x.dtype)
    return out if residual is None else (out, x)


def rms_norm(x, weight, eps: float, residual: Optional[torch.Tensor] = None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return out if residual is None else (out, x)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [N] in fp32 (0 where the target is ``ignore_index``); logits [N, V]."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")

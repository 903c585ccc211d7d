"""Rotary position embedding tables (cos/sin) for arbitrary positions."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [B|1, L] (int) -> cos, sin [B|1, L, rotary_dim // 2] float32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos(), angles.sin()

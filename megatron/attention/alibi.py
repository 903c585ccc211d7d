"""ALiBi: a linear distance penalty on attention scores, one slope per head (Press et al., as in
GPT-NeoX), and the segment-level form SepLLM's ALiBi-BiPE uses.

Query ``i`` attending to key ``j <= i`` gets ``-slope_h * (pos[i] - pos[j])`` added to its (scaled)
score, where ``pos`` is the token index for plain ALiBi and the segment index (separators seen before
the token) for ALiBi-BiPE. The bias is applied after the Sep-Attention mask decides who sees whom;
every impl takes an :class:`AlibiBias` and adds exactly this term.

Slopes: for ``n`` heads a power of two, the geometric sequence ``2^(-8/n), 2^(-16/n), ...``; otherwise
the sequence of the largest power of two below ``n`` followed by every other slope of twice that
power (GPT-NeoX and the ALiBi paper). Under tensor parallelism rank ``r`` holds heads
``[r * n/tp, (r + 1) * n/tp)`` and keeps exactly those slopes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch


def alibi_slopes(num_heads: int) -> List[float]:
    """The ALiBi slope of every head (all heads of the model, in head order)."""
    def power_of_two(n: int) -> List[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def local_alibi_slopes(num_heads: int, tp_size: int = 1, tp_rank: int = 0) -> List[float]:
    """The slopes of the query heads tensor-parallel rank ``tp_rank`` holds (num_heads / tp_size of them)."""
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} heads do not split over {tp_size} tensor-parallel ranks")
    per_rank = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * per_rank:(tp_rank + 1) * per_rank]


@dataclass(frozen=True)
class AlibiBias:
    """The ALiBi term of one forward: this rank's slopes and, for ALiBi-BiPE, the segment positions."""

    slopes: torch.Tensor  # [H] float32, this rank's query heads
    positions: Optional[torch.Tensor] = None  # [B, L] long segment index per token; None = token index

    def position_at(self, index: torch.Tensor) -> torch.Tensor:
        """The distance coordinate at token indices ``index`` [B|1, n] -> [B|1, n] (float32)."""
        if self.positions is None:
            return index.to(torch.float32)
        B = self.positions.shape[0]
        flat = index.clamp(0, self.positions.shape[1] - 1).expand(B, -1)
        return self.positions.gather(1, flat).to(torch.float32)

    def scores(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """Bias [B|1, H, Lq, Lk] (float32) for query indices [B|1, Lq] and key indices [B|1, Lk]."""
        q = self.position_at(q_index)
        k = self.position_at(k_index)
        dist = q[:, None, :, None] - k[:, None, None, :]
        return -self.slopes.to(dist.device)[None, :, None, None] * dist

    def dense(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Bias [B|1, H, q_len, k_len] for the last ``q_len`` of ``k_len`` positions."""
        k_index = torch.arange(k_len, device=device)[None]
        return self.scores(k_index[:, k_len - q_len:], k_index)


def additive_mask(keep: torch.Tensor, bias: Optional[AlibiBias], dtype: torch.dtype,
                  q_len: Optional[int] = None) -> torch.Tensor:
    """A float attention mask: the ALiBi bias where ``keep`` [B|1, 1|H, Lq, Lk] is True, -inf elsewhere."""
    if bias is None:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    values = bias.dense(q_len or keep.shape[-2], keep.shape[-1], keep.device)
    return values.masked_fill(~keep, float("-inf")).to(dtype)

"""Where the positions of a micro-batch live on this rank, applied from outside the model.

The model holds one :class:`SequenceSharding` (built from its layout) and asks it, at the places a
micro-batch enters the model, for this rank's part of a whole-sequence tensor (tokens, positions,
labels), for the attention backend of the forward and for the layout of what it adds to the
hidden states; the model itself never branches on ``cp_size`` or ``sequence_parallel``.

* context parallelism (``cp_size > 1``): this rank holds a chunk of every sequence
  (``context_parallel.py``) and attention exchanges keys/values with the other cp ranks;
* sequence parallelism: the hidden states between tensor-parallel regions hold ``L / tp`` positions,
  so a tensor every tp rank computes whole (the learned position embedding) is scattered.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.attention.backend import AttentionBackend, LocalAttention
from megatron.parallel.context_parallel import ContextParallelAttention, agree_over_cp, sequence_chunk
from megatron.parallel.layout import ParallelLayout
from megatron.parallel.mappings import scatter_to_sequence_parallel


class SequenceSharding:
    def __init__(self, layout: ParallelLayout):
        self.layout = layout
        self.context_parallel = layout.cp_size > 1

    def chunk(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of ``x``, which holds the whole sequence along ``dim``."""
        return sequence_chunk(x, self.layout, dim)

    def enter(self, tokens: torch.Tensor, positions: Optional[torch.Tensor]
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A micro-batch's tokens [B, L] and positions (None: 0..L-1) -> this rank's tokens and positions
        (positions stay None when this rank holds the whole sequence and none were given)."""
        if not self.context_parallel:
            return tokens, positions
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self.chunk(tokens), self.chunk(positions)

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same tokens on every cp rank (a later pipeline stage's; see ``agree_over_cp``)."""
        return agree_over_cp(tokens, self.layout)

    def attention(self, local: LocalAttention) -> AttentionBackend:
        """The attention backend of a forward whose whole-sequence tables ``local`` holds."""
        return ContextParallelAttention(local, self.layout) if self.context_parallel else local

    def to_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B|1, L, H], computed whole on every tensor-parallel rank, in the hidden states' layout."""
        return scatter_to_sequence_parallel(x, self.layout) if self.layout.sequence_parallel else x

"""Tensor-parallel layers (Megatron-Core style): column/row-parallel linear, vocab-parallel embedding.

Each layer takes the :class:`~megatron.parallel.layout.ParallelLayout` whose tensor-parallel group it
splits over, and an ``init_method`` for its weight. Construction only allocates this rank's shard
(``torch.empty``, so a model builds on the ``meta`` device for free); the values come from
:func:`megatron.model.init.init_weights`, which draws every *full* tensor from a generator keyed by
the parameter's name and keeps this rank's slice, so any TP/PP layout starts from bit-identical weights.
Parameters carry what that needs: ``tensor_parallel_dim`` and ``init_method``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.parallel.layout import ParallelLayout
from megatron.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
)

InitMethod = Callable[[Tuple[int, ...], torch.Generator], torch.Tensor]  # a full (unsplit) tensor


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """Record that ``param`` is a TP shard split along ``dim`` (init, grad-norm, checkpoint merge)."""
    param.tensor_parallel_dim = dim
    param.tensor_model_parallel = True  # DeepSpeed's spelling (ZeRO grad norm counts shards on every rank)


def mark_sequence_parallel(param: Optional[nn.Parameter]) -> None:
    """``param`` is replicated across TP but sees only this rank's part of the sequence: its gradient
    is partial and is summed over the TP group before the optimizer step."""
    if param is not None:
        param.sequence_parallel = True


def new_parameter(*shape: int, init_method: Optional[InitMethod] = None) -> nn.Parameter:
    """An uninitialised parameter of this rank's ``shape``; ``init_method`` None means zeros."""
    param = nn.Parameter(torch.empty(*shape))
    param.init_method = init_method
    return param


def _split_size(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} {size} is not divisible by tensor parallel size {tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim; output stays split unless gather_output.
    With sequence parallelism the input arrives split along the sequence and is all-gathered."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, layout: ParallelLayout,
                 init_method: InitMethod, gather_output: bool = False):
        super().__init__()
        self.layout, self.gather_output = layout, gather_output
        out_local = _split_size(out_features, layout.tp_size, "output size")
        self.weight = new_parameter(out_local, in_features, init_method=init_method)
        self.bias = new_parameter(out_local) if bias else None
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        x = gather_from_sequence_parallel(x, lay) if lay.sequence_parallel else copy_to_tp(x, lay)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, lay) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim; partial outputs are summed across TP
    (reduce-scattered along the sequence under sequence parallelism)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, layout: ParallelLayout,
                 init_method: InitMethod):
        super().__init__()
        self.layout = layout
        in_local = _split_size(in_features, layout.tp_size, "input size")
        self.weight = new_parameter(out_features, in_local, init_method=init_method)
        self.bias = new_parameter(out_features) if bias else None
        mark_tensor_parallel(self.weight, 1)
        if layout.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence_parallel(y, lay) if lay.sequence_parallel else reduce_from_tp(y, lay)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows across TP ranks."""

    def __init__(self, vocab_size: int, hidden: int, *, layout: ParallelLayout, init_method: InitMethod):
        super().__init__()
        self.layout = layout
        self.vocab_size = vocab_size
        self.shard_size = _split_size(vocab_size, layout.tp_size, "vocab size")
        self.vocab_start = layout.tp_rank * self.shard_size
        self.weight = new_parameter(self.shard_size, hidden, init_method=init_method)
        mark_tensor_parallel(self.weight, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if lay.tp_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_to_sequence_parallel(out, lay) if lay.sequence_parallel else reduce_from_tp(out, lay)


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, layout: ParallelLayout,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits for this rank's vocabulary shard (never gathered); a sequence-parallel ``hidden`` is
    all-gathered along the sequence first."""
    if layout.sequence_parallel:
        return F.linear(gather_from_sequence_parallel(hidden, layout), weight, bias)
    return F.linear(copy_to_tp(hidden, layout), weight, bias)

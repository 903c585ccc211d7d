"""Tensor-parallel layers (Megatron-Core style): column/row-parallel linear, vocab-parallel embedding.

Weights are initialised as the full (unsplit) master tensor from a generator keyed by the
parameter's name, then sliced: any TP/PP layout starts from bit-identical weights.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.parallel.mappings import (copy_to_tp, gather_from_sequence_parallel, gather_from_tp,
                                        reduce_from_tp, reduce_scatter_to_sequence_parallel)
from megatron.parallel.state import get_state


def master_normal(shape, std: float, seed: int, key: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    return torch.randn(*shape, generator=gen) * std


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """Record that ``param`` is a TP shard split along ``dim`` (grad-norm, checkpoint merge)."""
    param.tensor_parallel_dim = dim
    param.tensor_model_parallel = True  # DeepSpeed's spelling (ZeRO grad norm counts shards on every rank)


def mark_sequence_parallel(param: Optional[nn.Parameter]) -> None:
    """``param`` is replicated across TP but sees only this rank's part of the sequence: its gradient
    is partial and is summed over the TP group before the optimizer step."""
    if param is not None:
        param.sequence_parallel = True


def tp_shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    st = get_state()
    if st.tp_size == 1:
        return t
    return t.chunk(st.tp_size, dim=dim)[st.tp_rank].clone()


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim; output stays split unless gather_output.
    With ``sequence_parallel`` the input arrives split along the sequence and is all-gathered."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float, seed: int,
                 key: str, gather_output: bool = False, sequence_parallel: bool = False):
        super().__init__()
        tp = get_state().tp_size
        if out_features % tp:
            raise ValueError(f"{key}: output size {out_features} is not divisible by tensor parallel size {tp}")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = nn.Parameter(tp_shard(master_normal((out_features, in_features), init_std, seed,
                                                          key + ".weight"), 0))
        self.bias = nn.Parameter(torch.zeros(out_features // tp)) if bias else None
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sequence_parallel(x) if self.sequence_parallel else copy_to_tp(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim; partial outputs are summed across TP
    (reduce-scattered along the sequence with ``sequence_parallel``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float, seed: int,
                 key: str, sequence_parallel: bool = False):
        super().__init__()
        tp = get_state().tp_size
        self.sequence_parallel = sequence_parallel and tp > 1
        if in_features % tp:
            raise ValueError(f"{key}: input size {in_features} is not divisible by tensor parallel size {tp}")
        self.weight = nn.Parameter(tp_shard(master_normal((out_features, in_features), init_std, seed,
                                                          key + ".weight"), 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        mark_tensor_parallel(self.weight, 1)
        if self.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence_parallel(y) if self.sequence_parallel else reduce_from_tp(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows across TP ranks."""

    def __init__(self, vocab_size: int, hidden: int, init_std: float, seed: int, key: str,
                 sequence_parallel: bool = False):
        super().__init__()
        st = get_state()
        self.sequence_parallel = sequence_parallel and st.tp_size > 1
        if vocab_size % st.tp_size:
            raise ValueError(f"{key}: vocab size {vocab_size} is not divisible by tensor parallel "
                             f"size {st.tp_size}")
        self.vocab_size = vocab_size
        self.shard_size = vocab_size // st.tp_size
        self.vocab_start = st.tp_rank * self.shard_size
        self.weight = nn.Parameter(tp_shard(master_normal((vocab_size, hidden), init_std, seed,
                                                          key + ".weight"), 0))
        mark_tensor_parallel(self.weight, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if get_state().tp_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_to_sequence_parallel(out) if self.sequence_parallel else reduce_from_tp(out)


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """Logits for this rank's vocabulary shard (never gathered); a sequence-parallel ``hidden`` is
    all-gathered along the sequence first."""
    if sequence_parallel and get_state().tp_size > 1:
        return F.linear(gather_from_sequence_parallel(hidden), weight, bias)
    return F.linear(copy_to_tp(hidden), weight, bias)

"""Weight initialisation, separate from construction (so a model can be built on the ``meta`` device).

Layers record an ``init_method`` on each parameter (None = zeros). :func:`init_weights` draws every
parameter's *full* tensor from a generator seeded by (seed, parameter name) and copies this rank's
tensor-parallel slice into it, so every TP/PP layout starts from the weights of the one-rank model.
"""
from __future__ import annotations

import math
import zlib
from typing import Tuple

import torch
import torch.nn as nn

from megatron.parallel.layers import InitMethod


def normal_init(std: float) -> InitMethod:
    def init(shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std
    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """Output projections of residual branches: std / sqrt(2 * num_layers) (GPT-2, Megatron)."""
    return normal_init(std / math.sqrt(2 * num_layers))


def ones_init(shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.ones(*shape)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of ``model`` (a rank's shard, ``model.layout`` says which) in place.

    A parameter's generator key is its name, or its ``init_key`` attribute where two names must
    share values (the last pipeline stage's copy of a tied embedding is keyed ``embed.weight``).
    """
    layout = model.layout
    for name, param in model.named_parameters():
        method = getattr(param, "init_method", None)
        if method is None:
            param.zero_()
            continue
        tp_dim = getattr(param, "tensor_parallel_dim", None)
        shape = list(param.shape)
        if tp_dim is not None:
            shape[tp_dim] *= layout.tp_size
        full = method(tuple(shape), _generator(seed, getattr(param, "init_key", name)))
        if tp_dim is not None and layout.tp_size > 1:
            full = full.chunk(layout.tp_size, dim=tp_dim)[layout.tp_rank]
        param.copy_(full)

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


def small_init(std_dim: int) -> InitMethod:
    """Nguyen & Salazar's "small init": N(0, sqrt(2 / (5 * hidden))) (NeoX ``small_init``)."""
    return normal_init(math.sqrt(2 / (5 * std_dim)))


def wang_init(num_layers: int, hidden: int) -> InitMethod:
    """Ben Wang's output-layer init: N(0, 2 / (num_layers * sqrt(hidden))) (NeoX ``wang_init``)."""
    return normal_init(2 / num_layers / math.sqrt(hidden))


def _fans(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """torch's convention for a weight [out, in, ...]: (fan_in, fan_out) of the whole (unsplit) tensor."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def xavier_normal_init(shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    fan_in, fan_out = _fans(shape)
    return torch.randn(*shape, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out))


def xavier_uniform_init(shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    fan_in, fan_out = _fans(shape)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape, generator=gen) * 2 - 1) * bound


def orthogonal_init(gain: float) -> InitMethod:
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al.; QR of a Gaussian, signs fixed by R's diagonal)."""
    def init(shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        rows = shape[0]
        cols = math.prod(shape) // rows
        flat = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        if rows < cols:
            flat = flat.t()
        q, r = torch.linalg.qr(flat)
        q = q * torch.sign(torch.diagonal(r))
        if rows < cols:
            q = q.t()
        return (q * gain).to(torch.float32).reshape(shape)
    return init


def init_method_by_name(name: str, std: float, num_layers: int, hidden: int) -> InitMethod:
    """NeoX's ``init_method`` / ``output_layer_init_method`` choices, with NeoX's formulas.

    ``orthogonal`` uses gain sqrt(2) (NeoX's intended default of n_layers=1; NeoX's own dispatch
    passes its mup flag there and fails), ``scaled_orthogonal`` gain sqrt(2 / num_layers). Fans of
    the xavier inits are those of the whole (unsplit) matrix, as NeoX has with model_parallel_size 1.
    """
    table = {
        "normal": lambda: normal_init(std),
        "scaled_normal": lambda: scaled_normal_init(std, num_layers),
        "single_residual_scaled_normal": lambda: normal_init(std / math.sqrt(num_layers)),
        "small_init": lambda: small_init(hidden),
        "wang_init": lambda: wang_init(num_layers, hidden),
        "xavier_normal": lambda: xavier_normal_init,
        "xavier_uniform": lambda: xavier_uniform_init,
        "orthogonal": lambda: orthogonal_init(math.sqrt(2.0)),
        "scaled_orthogonal": lambda: orthogonal_init(math.sqrt(2.0 / num_layers)),
    }
    if name not in table:
        raise ValueError(f"unknown init method {name!r}; expected one of {', '.join(table)}")
    return table[name]()


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

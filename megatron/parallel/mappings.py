"""Autograd-aware collectives across the tensor-parallel group (identity when tp_size == 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.parallel.state import get_state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if st.tp_size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=st.tp_group)
    return x


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if st.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if st.tp_size == 1:
        return x
    return x.chunk(st.tp_size, dim=-1)[st.tp_rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, g):
        return _split_last_dim(g)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _GatherFromTP.apply(x)

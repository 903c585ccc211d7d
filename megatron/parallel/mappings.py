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


# ---------------------------------------------------------------- sequence parallelism
# Activations outside the tensor-parallel regions (norms, residuals, dropout) are split along the
# sequence dimension (dim 1 of [B, L, H]) across the TP group; a column-parallel input all-gathers
# the sequence, a row-parallel output reduce-scatters it (Megatron-LM's sequence parallelism).
SEQ_DIM = 1


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if x.shape[SEQ_DIM] % st.tp_size:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by tensor parallel size "
                         f"{st.tp_size} (needed by sequence_parallel)")
    return x.chunk(st.tp_size, dim=SEQ_DIM)[st.tp_rank].contiguous()


def _gather_seq(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if dist.get_backend(st.tp_group) == "nccl":
        x = x.transpose(0, SEQ_DIM).contiguous()  # the scattered dim must lead
        out = torch.empty((x.shape[0] // st.tp_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=st.tp_group)
        return out.transpose(0, SEQ_DIM).contiguous()
    return _split_seq(_all_reduce(x.clone()))  # gloo has no reduce-scatter; same result


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g)


class _GatherFromSequence(torch.autograd.Function):
    """Forward all-gather; backward reduce-scatter: the gathered tensor feeds a TP-split
    computation, so every rank holds a partial gradient of the whole sequence."""

    @staticmethod
    def forward(ctx, x):
        return _gather_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g)


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g)


def scatter_to_sequence_parallel(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _ScatterToSequence.apply(x)


def gather_from_sequence_parallel(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _GatherFromSequence.apply(x)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor) -> torch.Tensor:
    return x if get_state().tp_size == 1 else _ReduceScatterToSequence.apply(x)

"""Autograd-aware collectives across the tensor-parallel group of a layout (identity when tp == 1).

Each mapping is a pair (forward op, backward op): the backward of a collective is its adjoint
(all-reduce <-> identity, all-gather <-> split or reduce-scatter). Every mapping takes the
:class:`~megatron.parallel.layout.ParallelLayout` whose ``tp_group`` it works on.

Sequence parallelism: activations outside the tensor-parallel regions (norms, residuals, dropout) are
split along the sequence (dim 1 of [B, L, H]) across the TP group; a column-parallel input all-gathers
the sequence, a row-parallel output reduce-scatters it (Megatron-LM's sequence parallelism).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron.parallel.layout import ParallelLayout

SEQ_DIM = 1
Op = Callable[[torch.Tensor, ParallelLayout], torch.Tensor]


def sum_over_tp(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """A new tensor: ``x`` summed over the tensor-parallel group."""
    x = x.clone().contiguous()
    dist.all_reduce(x, group=layout.tp_group)
    return x


def _gather(dim: int) -> Op:
    def gather(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(layout.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=layout.tp_group)
        return torch.cat(parts, dim=dim)
    return gather


def _split(dim: int) -> Op:
    def split(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
        if x.shape[dim] % layout.tp_size:
            raise ValueError(f"size {x.shape[dim]} of dim {dim} is not divisible by tensor parallel size "
                             f"{layout.tp_size}" + (" (sequence_parallel needs seq_length % tp == 0)"
                                                    if dim == SEQ_DIM else ""))
        return x.chunk(layout.tp_size, dim=dim)[layout.tp_rank].contiguous()
    return split


def _reduce_scatter_seq(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    if dist.get_backend(layout.tp_group) == "nccl":
        x = x.transpose(0, SEQ_DIM).contiguous()  # the scattered dim must lead
        out = torch.empty((x.shape[0] // layout.tp_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=layout.tp_group)
        return out.transpose(0, SEQ_DIM).contiguous()
    return _split(SEQ_DIM)(sum_over_tp(x, layout), layout)  # gloo has no reduce-scatter; same result


def _identity(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    return x


def _mapping(name: str, forward: Op, backward: Op) -> Op:
    def fwd(ctx, x, layout):
        ctx.layout = layout
        return forward(x, layout)

    def bwd(ctx, grad):
        return backward(grad, ctx.layout), None

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

    def apply(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
        return x if layout.tp_size == 1 else fn.apply(x, layout)
    apply.__name__ = name
    return apply


# Tensor parallelism (hidden states replicated across TP ranks).
copy_to_tp = _mapping("copy_to_tp", _identity, sum_over_tp)
reduce_from_tp = _mapping("reduce_from_tp", sum_over_tp, _identity)
gather_from_tp = _mapping("gather_from_tp", _gather(-1), _split(-1))
# Sequence parallelism. The gathered sequence feeds a TP-split computation, so each rank holds a
# partial gradient of the whole sequence: its backward sums and scatters.
scatter_to_sequence_parallel = _mapping("scatter_to_sequence_parallel", _split(SEQ_DIM), _gather(SEQ_DIM))
gather_from_sequence_parallel = _mapping("gather_from_sequence_parallel", _gather(SEQ_DIM), _reduce_scatter_seq)
reduce_scatter_to_sequence_parallel = _mapping("reduce_scatter_to_sequence_parallel", _reduce_scatter_seq,
                                               _gather(SEQ_DIM))

"""Gradient and value synchronisation outside the tensor-parallel layers: data-parallel averaging
(DDP semantics, one flat buffer), the tied-embedding all-reduce between first and last pipeline stage,
and the TP sum of sequence-parallel gradients.

Under context parallelism each rank's loss is the mean over its part of the sequence (equal parts),
so losses and gradients are averaged over the data-parallel x context-parallel ranks (Megatron's
"data parallel group with cp"): the result is the mean over every token, as on one rank."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.parallel.layout import ParallelLayout


def _allreduce_flat(grads: List[torch.Tensor], group, average: bool) -> None:
    """Sum (or average) tensors over ``group`` in place, as one flat buffer."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def replica_group(layout: ParallelLayout):
    """The ranks holding the same parameters but different data: data-parallel, times context-parallel."""
    return layout.dp_cp_group if layout.cp_size > 1 else layout.dp_group


def allreduce_gradients(params: List[torch.nn.Parameter], layout: ParallelLayout) -> None:
    """Average gradients over the data-parallel (x context-parallel) group, as one flat buffer."""
    if layout.dp_size * layout.cp_size > 1:
        _allreduce_flat([p.grad for p in params if p.grad is not None], replica_group(layout), average=True)


def average_over_dp(value: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The mean of ``value`` over the data-parallel (x context-parallel) ranks (a new tensor)."""
    if layout.dp_size * layout.cp_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=replica_group(layout))
    return value / (layout.dp_size * layout.cp_size)


def tied_embedding_weight(model: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """This stage's copy of a weight tied across the first and last pipeline stage, if any."""
    layout = model.layout
    if layout.pp_size == 1 or model.config.no_weight_tying:
        return None
    if layout.is_first_stage:
        return model.embed.weight
    if layout.is_last_stage:
        return model.lm_head.weight
    return None


def allreduce_tied_embedding_grads(model: torch.nn.Module) -> None:
    """Sum the input-embedding and LM-head gradients of a tied embedding split over two stages,
    so both copies take the same optimizer step and stay equal."""
    weight = tied_embedding_weight(model)
    if weight is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=model.layout.embedding_group)


def sequence_parallel_params(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum, over the TP group, the gradients of parameters that saw only this rank's part of the
    sequence (norms, row-parallel biases under sequence parallelism), as one flat buffer."""
    if model.layout.tp_size > 1:
        _allreduce_flat([p.grad for p in sequence_parallel_params(model) if p.grad is not None],
                        model.layout.tp_group, average=False)

"""Process groups for tensor x pipeline x data parallelism.

Rank order follows Megatron: tensor-parallel ranks are adjacent, then data-parallel, then pipeline:
``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    dp_group: Optional[object] = None
    embedding_group: Optional[object] = None  # first + last pipeline stage, for tied embeddings
    pp_ranks: tuple = (0,)  # global ranks of this rank's pipeline

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_STATE = ParallelState()


def get_state() -> ParallelState:
    return _STATE


def set_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def initialize_model_parallel(tp: int, pp: int) -> ParallelState:
    """Create the groups; torch.distributed must be initialized. Every rank calls this."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp {tp} x pp {pp}")
    dp = world // (tp * pp)
    state = ParallelState(tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=rank % tp,
                          dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp))

    def rank_of(p, d, t):
        return p * dp * tp + d * tp + t

    # new_group must be called by every rank for every group, in the same order.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(p, d, t) for t in range(tp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                state.tp_group = g
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for d in range(dp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                state.dp_group = g
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for p in range(pp)]
            g = dist.new_group(ranks)
            e = dist.new_group(sorted({ranks[0], ranks[-1]}))
            if rank in ranks:
                state.pp_group, state.embedding_group, state.pp_ranks = g, e, tuple(ranks)
    set_state(state)
    return state


def reset_state() -> None:
    set_state(ParallelState())

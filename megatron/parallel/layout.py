"""The parallel layout of one rank: sizes, ranks and process groups, passed explicitly to whatever
needs them (model, layers, engines, checkpoints); there is no process-wide parallel state.

Rank order follows Megatron: tensor-parallel ranks are adjacent, then context-parallel, then
data-parallel, then pipeline:
``rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``.

A layout without process groups (``groups=False`` in :func:`layout_for_rank`) describes any rank
of any layout in one process: enough to build that rank's model shard (resharding, conversion,
meta-device parameter counts, tests). Collectives need the groups of :func:`initialize_model_parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.distributed as dist

ProcessGroup = Optional[object]


@dataclass(frozen=True)
class ParallelLayout:
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    cp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    virtual_pipe_stages: int = 1
    sequence_parallel: bool = False  # activations outside TP regions split along the sequence (tp > 1)
    tp_group: ProcessGroup = field(default=None, compare=False, repr=False)
    pp_group: ProcessGroup = field(default=None, compare=False, repr=False)
    dp_group: ProcessGroup = field(default=None, compare=False, repr=False)
    cp_group: ProcessGroup = field(default=None, compare=False, repr=False)
    dp_cp_group: ProcessGroup = field(default=None, compare=False, repr=False)  # dp x cp ranks (cp > 1)
    embedding_group: ProcessGroup = field(default=None, compare=False, repr=False)  # first + last stage
    pp_ranks: Tuple[int, ...] = (0,)  # global ranks of this rank's pipeline, first stage first

    def __post_init__(self):
        # Sequence parallelism only means something with tensor parallelism.
        object.__setattr__(self, "sequence_parallel", self.sequence_parallel and self.tp_size > 1)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size * self.dp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def chunks(self) -> int:
        """Model chunks this rank holds: ``virtual_pipe_stages`` when pipelined, else 1."""
        return self.virtual_pipe_stages if self.pp_size > 1 else 1

    def stage_layer_ids(self, num_layers: int) -> List[Tuple[int, List[int]]]:
        """(pipeline stage index, global layer ids) of each chunk this rank holds; with v chunks per
        rank, chunk c is stage ``c * pp + pp_rank`` (interleaved 1F1B)."""
        per = num_layers // (self.pp_size * self.chunks)
        stages = [c * self.pp_size + self.pp_rank for c in range(self.chunks)]
        return [(s, list(range(s * per, (s + 1) * per))) for s in stages]

    def layer_ids(self, num_layers: int) -> List[int]:
        """Global ids of every layer this rank holds, in order."""
        return [i for _, ids in self.stage_layer_ids(num_layers) for i in ids]


def global_rank(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, tp: int, cp: int, dp: int) -> int:
    return ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank


def layout_for_rank(world_size: int, rank: int, tp: int = 1, pp: int = 1, cp: int = 1,
                    virtual_pipe_stages: int = 1, sequence_parallel: bool = False) -> ParallelLayout:
    """Sizes and ranks of ``rank`` in a world of ``world_size`` (no process groups)."""
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp {tp} x cp {cp} x pp {pp}")
    dp = world_size // (tp * pp * cp)
    tp_rank, rest = rank % tp, rank // tp
    cp_rank, rest = rest % cp, rest // cp
    dp_rank, pp_rank = rest % dp, rest // dp
    pp_ranks = tuple(global_rank(tp_rank, cp_rank, dp_rank, p, tp, cp, dp) for p in range(pp))
    return ParallelLayout(tp, pp, dp, cp, tp_rank, pp_rank, dp_rank, cp_rank, virtual_pipe_stages,
                          sequence_parallel, pp_ranks=pp_ranks)


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, virtual_pipe_stages: int = 1,
                              sequence_parallel: bool = False) -> ParallelLayout:
    """This rank's layout with its process groups; torch.distributed must be initialized. Collective:
    every rank calls it with the same sizes (``new_group`` must see every group in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    base = layout_for_rank(world, rank, tp, pp, cp, virtual_pipe_stages, sequence_parallel)
    dp = base.dp_size
    ranks_of = {
        "tp_group": lambda p, d, c, t: [global_rank(x, c, d, p, tp, cp, dp) for x in range(tp)],
        "cp_group": lambda p, d, c, t: [global_rank(t, x, d, p, tp, cp, dp) for x in range(cp)],
        "dp_group": lambda p, d, c, t: [global_rank(t, c, x, p, tp, cp, dp) for x in range(dp)],
        "pp_group": lambda p, d, c, t: [global_rank(t, c, d, x, tp, cp, dp) for x in range(pp)],
        # Parameters replicated over data- and context-parallel ranks average their gradients here.
        "dp_cp_group": lambda p, d, c, t: [global_rank(t, y, x, p, tp, cp, dp) for x in range(dp) for y in range(cp)],
    }
    if cp == 1:
        del ranks_of["cp_group"], ranks_of["dp_cp_group"]  # no context parallelism: dp_group is the group
    groups = {}
    for name, members in ranks_of.items():
        seen = set()
        for p in range(pp):
            for d in range(dp):
                for c in range(cp):
                    for t in range(tp):
                        ranks = tuple(members(p, d, c, t))
                        if ranks in seen:
                            continue
                        seen.add(ranks)
                        group = dist.new_group(list(ranks))
                        if rank in ranks:
                            groups[name] = group
                        if name == "pp_group":
                            emb = dist.new_group(sorted({ranks[0], ranks[-1]}))
                            if rank in ranks:
                                groups["embedding_group"] = emb
    return ParallelLayout(tp, pp, dp, cp, base.tp_rank, base.pp_rank, base.dp_rank, base.cp_rank,
                          virtual_pipe_stages, sequence_parallel, pp_ranks=base.pp_ranks, **groups)


def layout_from_config(cfg, world_size: int = 1, rank: int = 0, groups: bool = False) -> ParallelLayout:
    """The layout a config asks for (``groups=True``: create the process groups, collective)."""
    par = cfg.parallel
    args = dict(tp=par.model_parallel_size, pp=par.pipe_parallel_size, cp=par.context_parallel_size,
                virtual_pipe_stages=par.virtual_pipe_stages, sequence_parallel=par.sequence_parallel)
    if groups and (world_size > 1 or dist.is_initialized()):  # one-rank groups too (ZeRO on one process)
        return initialize_model_parallel(**args)
    return layout_for_rank(world_size, rank, **args)

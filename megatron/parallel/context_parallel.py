"""Context parallelism: the sequence of every micro-batch is split over the ``cp`` ranks of a
context-parallel group (balanced: rank ``r`` holds segments ``r`` and ``2 cp - 1 - r`` of ``2 cp``),
and attention layers exchange only what the rule needs.

* Sep-Attention layers (:class:`ExchangeKV`): each rank sends every other rank the keys/values that
  rank's queries can see and it holds -- the initial tokens and separators before the receiver's
  window (compacted: bytes scale with the separator count) and the ``n_local - 1`` positions of the
  halo -- then attends locally (``megatron/attention/context_parallel.py``). The backward sends the
  gradients of received keys/values back to their owners, which add them to their own.
* Full-attention layers (:class:`RingAttention`): ring attention; each step passes the chunk's
  keys/values to the next rank while attending to the current one (``attention/blockwise.py``);
  the backward passes key/value gradients around with them.

Every cp rank holds the whole micro-batch of token ids, so the separator flags, document ids and
with them every rank's send/receive plan are computed locally, identically on every rank: only
keys, values and their gradients travel, by point-to-point messages in the cp group.

Parameters are replicated over cp ranks; each rank's loss is the mean over its tokens (equal
counts), so gradients are averaged over data-parallel x context-parallel ranks
(``data_parallel.py``), which makes the loss and every gradient equal to the one-rank run's.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.attention import SepRule
from megatron.attention.backend import LocalAttention
from megatron.attention.blockwise import blocks_backward, blocks_forward, placed
from megatron.attention.compact import stats_dtype
from megatron.attention.context_parallel import (
    RankPlan,
    build_rank_plans,
    segment_attention,
    sequence_segments,
    take_segments,
)
from megatron.attention.impls import CONTEXT_PARALLEL_IMPLS, kernel
from megatron.errors import ConfigError
from megatron.parallel.layout import ParallelLayout


def local_segments(seq_len: int, layout: ParallelLayout) -> List[Tuple[int, int]]:
    """The global positions this rank's chunk holds (whole sequence when cp == 1)."""
    return sequence_segments(seq_len, layout.cp_size, layout.cp_rank)


def sequence_chunk(x: torch.Tensor, layout: ParallelLayout, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of ``x``, which holds the whole sequence along ``dim`` (inputs, positions, labels)."""
    if layout.cp_size == 1:
        return x
    return take_segments(x, local_segments(x.shape[dim], layout), dim)


def agree_over_cp(tokens: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """cp rank 0's ``tokens`` on every cp rank. A later pipeline stage gets the tokens from the previous
    stage, and during torch's first shape inference these are uninitialised placeholders; the
    exchange plans are built from them, so every cp rank must see the same ones."""
    if layout.cp_size == 1:
        return tokens
    tokens = tokens.contiguous().clone()
    dist.broadcast(tokens, group=layout.cp_group, group_src=0)
    return tokens


def _start(sends: List[Tuple[int, torch.Tensor]], recvs: List[Tuple[int, torch.Tensor]], group,
           tag: int = 0) -> list:
    """Post point-to-point messages in ``group`` (peers are group ranks); returns the works to wait on.
    Messages in flight together between the same two ranks need different tags."""
    if not sends and not recvs:
        return []
    if dist.get_backend(group) == "nccl":  # NCCL needs the pairs batched to avoid ordering deadlocks
        ops = ([dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=p) for p, t in sends]
               + [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=p) for p, t in recvs])
        return dist.batch_isend_irecv(ops)
    return ([dist.isend(t, group=group, tag=tag, group_dst=p) for p, t in sends]
            + [dist.irecv(t, group=group, tag=tag, group_src=p) for p, t in recvs])


def _exchange(sends: List[Tuple[int, torch.Tensor]], recvs: List[Tuple[int, torch.Tensor]], group) -> None:
    for work in _start(sends, recvs, group):
        work.wait()


def _gather_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    B, H, _, D = like.shape
    return index[:, None, :, None].expand(B, H, index.shape[1], D)


class ExchangeKV(torch.autograd.Function):
    """k, v [B, Hkv, Lc, D] of this rank -> the keys/values it receives, [B, Hkv, R, D] each (pieces
    from each source rank in ascending order); backward returns the received keys' gradients to
    their owners and adds the ones this rank's keys got elsewhere."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, plan: RankPlan, group) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.plan, ctx.group = plan, group
        sends = [(d, torch.stack([k.gather(2, _gather_index(idx, k)), v.gather(2, _gather_index(idx, v))]))
                 for d, idx in plan.sends.items()]
        B, H, _, D = k.shape
        recvs = [(s, k.new_empty(2, B, H, n, D)) for s, n in plan.recvs.items()]
        _exchange(sends, recvs, group)
        if not recvs:
            empty = k.new_empty(B, H, 0, D)
            return empty, empty.clone()
        return torch.cat([t[0] for _, t in recvs], dim=2), torch.cat([t[1] for _, t in recvs], dim=2)

    @staticmethod
    def backward(ctx, grad_k: Optional[torch.Tensor], grad_v: Optional[torch.Tensor]):
        plan: RankPlan = ctx.plan
        sizes = list(plan.recvs.values())
        grad_k = grad_k if grad_k is not None else torch.zeros_like(grad_v)
        grad_v = grad_v if grad_v is not None else torch.zeros_like(grad_k)
        back = [(s, torch.stack([gk, gv])) for s, gk, gv in
                zip(plan.recvs, grad_k.split(sizes, dim=2), grad_v.split(sizes, dim=2))]
        B, H, _, D = grad_k.shape
        mine = [(d, grad_k.new_empty(2, B, H, idx.shape[1], D)) for d, idx in plan.sends.items()]
        _exchange(back, mine, ctx.group)
        dk = grad_k.new_zeros(B, H, plan.chunk_len, D)
        dv = torch.zeros_like(dk)
        for d, g in mine:
            valid = plan.send_valid[d][:, None, :, None].to(g.dtype)  # padding slots carry no gradient
            index = _gather_index(plan.sends[d], dk)
            dk.scatter_add_(2, index, g[0] * valid)
            dv.scatter_add_(2, index, g[1] * valid)
        return dk, dv, None, None


def _ring_start(x: torch.Tensor, layout: ParallelLayout, out: torch.Tensor, tag: int = 0) -> list:
    """Send ``x`` to the next rank of the cp ring and receive the previous rank's into ``out``."""
    cp, r = layout.cp_size, layout.cp_rank
    return _start([((r + 1) % cp, x)], [((r - 1) % cp, out)], layout.cp_group, tag)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class RingAttention(torch.autograd.Function):
    """Full causal attention of this rank's chunk over the whole sequence: the keys/values of every
    rank pass around the cp ring (cp - 1 steps); the backward passes their gradients along with
    them and returns each rank's own after a last step."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ParallelLayout, seq_len: int,
                doc_ids: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        cp, r = layout.cp_size, layout.cp_rank
        segs = [placed(sequence_segments(seq_len, cp, j)) for j in range(cp)]
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=stats_dtype(q.dtype), device=q.device)
        kv = torch.stack([k, v])
        for step in range(cp):  # the next chunk travels while this one is attended to
            incoming = torch.empty_like(kv) if step < cp - 1 else None
            works = _ring_start(kv, layout, incoming) if incoming is not None else []
            blocks_forward(q, kv[0], kv[1], segs[r], segs[(r - step) % cp], doc_ids, scale, out, lse)
            _wait(works)
            kv = incoming if incoming is not None else kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.segs, ctx.doc_ids, ctx.scale = layout, segs, doc_ids, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        layout, segs = ctx.layout, ctx.segs
        cp, r = layout.cp_size, layout.cp_rank
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv)
        for step in range(cp):
            incoming = torch.empty_like(kv) if step < cp - 1 else None
            works = _ring_start(kv, layout, incoming) if incoming is not None else []
            blocks_backward(grad_out, q, kv[0], kv[1], out, lse, segs[r], segs[(r - step) % cp], ctx.doc_ids,
                            ctx.scale, dq, dkv[0], dkv[1])
            passed = torch.empty_like(dkv)  # the gradient travels with its chunk, then comes home
            _wait(works + _ring_start(dkv, layout, passed, tag=1))
            dkv = passed
            kv = incoming if incoming is not None else kv
        return dq, dkv[0], dkv[1], None, None, None, None


class ContextParallelAttention:
    """The attention backend of one forward under context parallelism (``attention/backend.py``),
    shared by all layers: ``local`` holds the global flags and this chunk's rotary tables; each rule's
    exchange plan for this rank is built on first use."""

    def __init__(self, local: LocalAttention, layout: ParallelLayout):
        self.local, self.layout = local, layout
        self.is_sep, self.doc_ids = local.is_sep, local.doc_ids
        self.seq_len = self.is_sep.shape[1]
        self._plans: Dict[SepRule, RankPlan] = {}

    def plan(self, rule: SepRule) -> RankPlan:
        if rule not in self._plans:
            lay = self.layout
            self._plans[rule] = build_rank_plans(self.is_sep, rule, self.doc_ids, lay.cp_size, [lay.cp_rank])[0]
        return self._plans[rule]

    def attend(self, layer: int, rule: SepRule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lc, Hq, D], k/v [B, Lc, Hkv, D] of this rank's chunk (unrotated) -> [B, Lc, Hq, D]."""
        q, k, v = self.local.heads_first(q, k, v)
        return self.attend_chunk(q, k, v, rule, self.local.impl).transpose(1, 2)

    def attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rule: SepRule, impl: str,
                     scale: Optional[float] = None) -> torch.Tensor:
        """q [B, Hq, Lc, D], k/v [B, Hkv, Lc, D] of this rank's chunk -> [B, Hq, Lc, D]."""
        if impl not in CONTEXT_PARALLEL_IMPLS:
            raise ConfigError(f"attention.impl {impl!r} does not run with context parallelism; use one of "
                              f"{', '.join(CONTEXT_PARALLEL_IMPLS)}")
        if q.device.type not in kernel(impl).context_parallel:
            raise ConfigError("context_parallel_size > 1 runs on CPU kernels only for now (compact, reference, "
                              "ring steps on the CPU flash kernel); the GPU path is not implemented")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        docs = self.doc_ids if rule.separate_documents else None
        if rule.is_full or impl == "sdpa":
            return RingAttention.apply(q, k, v, self.layout, self.seq_len, docs, scale)
        plan = self.plan(rule)
        k_recv, v_recv = ExchangeKV.apply(k, v, plan, self.layout.cp_group)
        k_pool, v_pool = torch.cat([k, k_recv], dim=2), torch.cat([v, v_recv], dim=2)
        return segment_attention(q, k_pool, v_pool, plan, rule, self.is_sep, docs, impl, scale)

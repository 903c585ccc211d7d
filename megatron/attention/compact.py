"""Compact Sep-Attention for CPU training (impl ``compact``), forward and backward.

Query ``i`` sees exactly two disjoint key sets:
  * the local band ``(i - n_local, i]``;
  * the *specials* (initial tokens and separators) at positions ``<= i - n_local``.
Specials are gathered, in order, into a compact set of ``S`` keys (padded per batch row
to the longest row). Because they are sorted by position, the specials visible to
query ``i`` are a prefix of the compact set, so over a block of queries the special part
is block-triangular: query block ``[a, b)`` only needs compact keys ``[lo, hi)``.

Per query block two fused CPU flash-attention calls (PyTorch's kernel, which also returns
the log-sum-exp) cover it:
  * *prefix*: compact specials ``[full_lo, full_hi)`` seen by every query of the block --
    no mask at all, and the keys are a view (no copy);
  * *near*: the remaining specials of ``[lo, hi)`` (the block's diagonal) and the local keys
    ``x[a0:b]``, with a small additive mask.
The two partial results are merged through their log-sum-exps. The backward of attention
over a union of key sets only needs the merged output and log-sum-exp, so each part's
backward is one fused call too. The custom autograd Function saves q, k, v, the merged
outputs and log-sum-exps and recomputes keys and masks, accumulating dk/dv into
preallocated buffers. GQA is handled by folding the query heads of a group into the
query-row dimension, so K/V are never repeated. Nothing of size L x L is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron.attention.sepllm_rule import SepRule, positions_in_document

DEFAULT_BLOCK = 128
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass
class QueryBlock:
    """One block of queries ``[start, end)`` and the keys it needs.

    Compact specials ``[special_lo, special_hi)`` may be visible to some query of the block;
    ``[full_lo, full_hi)`` (inside it, possibly empty) are visible to all of them.
    """

    start: int
    end: int
    special_lo: int
    special_hi: int
    full_lo: int
    full_hi: int
    local_start: int  # original keys [local_start, end)

    @property
    def has_prefix(self) -> bool:
        return self.full_hi > self.full_lo

    def near_special_ranges(self) -> List[Tuple[int, int]]:
        """Compact-special ranges handled by the masked (near) part."""
        if not self.has_prefix:
            return [(self.special_lo, self.special_hi)] if self.special_hi > self.special_lo else []
        return [(a, b) for a, b in ((self.special_lo, self.full_lo), (self.full_hi, self.special_hi)) if b > a]


@dataclass
class CompactPlan:
    """Everything derived from ``is_sep``/``doc_ids`` once per call (shared by fwd and bwd)."""

    special_idx: torch.Tensor  # [B, S] long, positions of the specials (padded slots point anywhere)
    special_pos: torch.Tensor  # [B, S] long, position for masking; padded slots = a position never visible
    special_doc: Optional[torch.Tensor]  # [B, S] document id of each special (None without documents)
    doc_ids: Optional[torch.Tensor]  # [B, L] (None without documents)
    blocks: List[QueryBlock]
    n_local: int
    seq_len: int


def special_flags(is_sep: torch.Tensor, rule: SepRule,
                  doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L] bool: token is initial (per document with ``separate_documents``) or a separator."""
    L = is_sep.shape[1]
    if rule.separate_documents and doc_ids is not None:
        pos = positions_in_document(doc_ids)
    else:
        pos = torch.arange(L, device=is_sep.device).expand_as(is_sep)
    return is_sep.bool() | (pos < rule.n_init)


def gather_specials(special: torch.Tensor, never_visible: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ordered positions of the specials per row, padded to the longest row.

    Returns ``(idx, pos)`` [B, S]: ``idx`` is safe to gather with, ``pos`` is ``idx`` on real
    slots and ``never_visible`` on padding.
    """
    B, L = special.shape
    count = special.sum(dim=1)
    S = int(count.max()) if B > 0 else 0
    # A stable sort on "not special" lists the specials first, in position order.
    idx = torch.argsort((~special).to(torch.int8), dim=1, stable=True)[:, :S]
    slot = torch.arange(S, device=special.device)
    pos = torch.where(slot[None, :] < count[:, None], idx, torch.full_like(idx, never_visible))
    return idx, pos


def _is_nondecreasing(x: torch.Tensor) -> bool:
    return bool((x[:, 1:] >= x[:, :-1]).all()) if x.shape[1] > 1 else True


def build_plan(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
               block: int = DEFAULT_BLOCK) -> CompactPlan:
    B, L = is_sep.shape
    dev = is_sep.device
    w = rule.n_local
    docs = doc_ids if (rule.separate_documents and doc_ids is not None) else None
    special = special_flags(is_sep, rule, docs)
    idx, pos = gather_specials(special, never_visible=L + w)
    special_doc = docs.gather(1, idx) if docs is not None else None

    starts = torch.arange(0, L, block, device=dev)
    lasts = torch.clamp(starts + block, max=L) - 1
    csum0 = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                       torch.cumsum(special.long(), dim=1)], dim=1)  # csum0[:, t + 1] = #specials <= t
    # Query i sees the specials at positions <= i - w: compact slots below c(i) = csum0[i - w + 1].
    hi = csum0[:, (lasts - w + 1).clamp(min=0)].amax(dim=0)
    full_hi = csum0[:, (starts - w + 1).clamp(min=0)].amin(dim=0)
    lo = torch.zeros_like(hi)
    full_lo = torch.zeros_like(hi)
    local_start = (starts - w + 1).clamp(min=0)
    if docs is not None:
        if _is_nondecreasing(docs):
            # Contiguous documents: a query sees nothing before its document's start.
            doc_start = torch.arange(L, device=dev) - positions_in_document(docs)  # [B, L]
            lo = csum0.gather(1, doc_start[:, starts]).amin(dim=0)
            full_lo = csum0.gather(1, doc_start[:, lasts]).amax(dim=0)
            local_start = torch.maximum(local_start, doc_start[:, starts].amin(dim=0))
        else:
            full_hi = full_lo  # ids repeat: leave every special to the masked part
    hi = torch.maximum(hi, lo)
    full_lo = torch.clamp(full_lo, min=lo)
    full_hi = torch.minimum(full_hi, hi)
    empty = full_hi <= full_lo
    full_lo = torch.where(empty, hi, full_lo)
    full_hi = torch.where(empty, hi, full_hi)
    blocks = [QueryBlock(a, z + 1, *rest) for a, z, *rest in
              zip(starts.tolist(), lasts.tolist(), lo.tolist(), hi.tolist(), full_lo.tolist(),
                  full_hi.tolist(), local_start.tolist())]
    return CompactPlan(idx, pos, special_doc, docs, blocks, w, L)


def near_mask(plan: CompactPlan, blk: QueryBlock, dtype: torch.dtype, group: int) -> torch.Tensor:
    """Additive mask [B, 1, group * rows, keys] of the near part (0 = attend, -inf = not)."""
    dev = plan.special_pos.device
    w = plan.n_local
    q_pos = torch.arange(blk.start, blk.end, device=dev)
    k_pos = torch.arange(blk.local_start, blk.end, device=dev)
    dist = q_pos[:, None] - k_pos[None, :]
    see_local = ((dist >= 0) & (dist < w))[None]  # [1, rows, nl]
    if plan.doc_ids is not None:
        q_doc = plan.doc_ids[:, blk.start:blk.end, None]
        see_local = see_local & (plan.doc_ids[:, None, blk.local_start:blk.end] == q_doc)
    parts = []
    for a, b in blk.near_special_ranges():
        see = plan.special_pos[:, None, a:b] <= (q_pos - w)[None, :, None]  # [B, rows, ns]
        if plan.doc_ids is not None:
            see = see & (plan.special_doc[:, None, a:b] == q_doc)
        parts.append(see)
    B = plan.special_pos.shape[0]
    keep = torch.cat(parts + [see_local.expand(B, -1, -1)], dim=-1) if parts else see_local
    mask = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill_(~keep, float("-inf"))[:, None]
    if group > 1:
        mask = mask.repeat(1, 1, group, 1)  # rows are (head-in-group, query)
    return mask


def _fold_group(x: torch.Tensor, group: int, start: int, end: int) -> torch.Tensor:
    """Query rows of a block [B, Hq, L, D] -> [B, Hkv, group * rows, D]."""
    B, Hq, _, D = x.shape
    blk = x[:, :, start:end]
    if group == 1:
        return blk
    return blk.reshape(B, Hq // group, group * (end - start), D)


def _unfold_group(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, group * rows, D] -> [B, Hkv * group, rows, D]."""
    if group == 1:
        return x
    B, Hkv, GR, D = x.shape
    return x.reshape(B, Hkv * group, GR // group, D)


def _near_keys(x: torch.Tensor, x_special: torch.Tensor, blk: QueryBlock) -> torch.Tensor:
    pieces = [x_special[:, :, a:b] for a, b in blk.near_special_ranges()]
    local = x[:, :, blk.local_start:blk.end]
    return torch.cat(pieces + [local], dim=2) if pieces else local


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, H, _, D = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def _merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Softmax over the union of two disjoint key sets from the two partial results."""
    lse = torch.logaddexp(lse1, lse2)
    out = o1.float() * torch.exp(lse1 - lse)[..., None] + o2.float() * torch.exp(lse2 - lse)[..., None]
    return out.to(o1.dtype), lse


class CompactSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CompactPlan,
                scale: float) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        k_special = _gather_rows(k, plan.special_idx)
        v_special = _gather_rows(v, plan.special_idx)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        outs, lses = [], []
        for blk in plan.blocks:
            q_blk = _fold_group(q, group, blk.start, blk.end)
            o, lse = _flash_fwd(q_blk, _near_keys(k, k_special, blk), _near_keys(v, v_special, blk),
                                0.0, False, attn_mask=near_mask(plan, blk, q.dtype, group), scale=scale)
            if blk.has_prefix:
                o_pre, lse_pre = _flash_fwd(q_blk, k_special[:, :, blk.full_lo:blk.full_hi],
                                            v_special[:, :, blk.full_lo:blk.full_hi], 0.0, False, scale=scale)
                o, lse = _merge(o_pre, lse_pre, o, lse)
            out[:, :, blk.start:blk.end] = _unfold_group(o, group)
            outs.append(o)
            lses.append(lse)
        ctx.save_for_backward(q, k, v)
        ctx.outs, ctx.lses, ctx.plan, ctx.scale = outs, lses, plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v = ctx.saved_tensors
        plan: CompactPlan = ctx.plan
        group = q.shape[1] // k.shape[1]
        k_special = _gather_rows(k, plan.special_idx)
        v_special = _gather_rows(v, plan.special_idx)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
        dk_special = torch.zeros_like(k_special)
        dv_special = torch.zeros_like(v_special)
        for blk, o, lse in zip(plan.blocks, ctx.outs, ctx.lses):
            g = _fold_group(grad_out, group, blk.start, blk.end).reshape(o.shape)
            q_blk = _fold_group(q, group, blk.start, blk.end)
            dq_b, dk_b, dv_b = _flash_bwd(g, q_blk, _near_keys(k, k_special, blk), _near_keys(v, v_special, blk),
                                          o, lse, 0.0, False, attn_mask=near_mask(plan, blk, q.dtype, group),
                                          scale=ctx.scale)
            offset = 0
            for a, b in blk.near_special_ranges():
                dk_special[:, :, a:b] += dk_b[:, :, offset:offset + b - a]
                dv_special[:, :, a:b] += dv_b[:, :, offset:offset + b - a]
                offset += b - a
            dk[:, :, blk.local_start:blk.end] += dk_b[:, :, offset:]
            dv[:, :, blk.local_start:blk.end] += dv_b[:, :, offset:]
            if blk.has_prefix:
                dq_pre, dk_pre, dv_pre = _flash_bwd(g, q_blk, k_special[:, :, blk.full_lo:blk.full_hi],
                                                    v_special[:, :, blk.full_lo:blk.full_hi], o, lse, 0.0,
                                                    False, scale=ctx.scale)
                dq_b = dq_b + dq_pre
                dk_special[:, :, blk.full_lo:blk.full_hi] += dk_pre
                dv_special[:, :, blk.full_lo:blk.full_hi] += dv_pre
            dq[:, :, blk.start:blk.end] = _unfold_group(dq_b, group)
        if dk_special.shape[2]:
            # Padded slots carry zero gradient (always masked), so scattering them is harmless.
            index = plan.special_idx[:, None, :, None].expand_as(dk_special)
            dk.scatter_add_(2, index, dk_special)
            dv.scatter_add_(2, index, dv_special)
        ctx.outs = ctx.lses = None
        return dq, dk, dv, None, None


def compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                      rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, block: int = DEFAULT_BLOCK,
                      plan: Optional[CompactPlan] = None) -> torch.Tensor:
    """Sep-Attention, q [B, Hq, L, D], k/v [B, Hkv, L, D], is_sep [B, L] -> [B, Hq, L, D].

    ``plan`` may be passed in to share it between layers with the same rule and inputs.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if plan is None:
        plan = build_plan(is_sep, rule, doc_ids, block)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return CompactSepAttention.apply(q, k, v, plan, scale)

"""Compact Sep-Attention for CPU training (impl ``compact``), forward and backward.

Query ``i`` sees exactly two disjoint key sets:
  * the local band ``(i - n_local, i]``;
  * the *specials* (initial tokens and separators) at positions ``<= i - n_local``.
Specials are gathered, in order, into a compact set of ``S`` keys (padded per batch row
to the longest row). Because they are sorted by position, the specials visible to
query ``i`` are a prefix of the compact set, so over a block of queries the special part
is block-triangular: query block ``[a, b)`` only needs compact keys ``[lo, hi)``.

Queries are processed in *prefix blocks* (``prefix_block`` rows), each split into *near
blocks* (``near_block`` rows), with PyTorch's fused CPU flash-attention kernel (which also
returns the log-sum-exp):
  * prefix: per prefix block, the compact specials that every query of the block sees --
    one call with no mask at all, keys are a view (no copy);
  * near: per near block, the rest of its specials (the block's diagonal) and its local
    band ``x[a0:b]``, with a small additive mask.
The partial results are merged through their log-sum-exps. The backward of attention over
a union of key sets needs only the merged output and log-sum-exp, so each part's backward
is one fused call too. The custom autograd Function saves q, k, v, the output and the
log-sum-exp, recomputes key blocks and masks, and accumulates dk/dv into preallocated
buffers. GQA is handled by folding the query heads of a group into the query rows, so K/V
are never repeated. Nothing of size L x L is built.

ALiBi (``alibi.py``) rides on the same calls: the fused kernel takes a per-head additive mask, so each
call gets the bias of its query rows and keys (the prefix call then has a mask too). The bias is a
constant, so forward and backward use the same mask and the log-sum-exp merge stays exact.

Block sizes: the CPU kernel is much more efficient on long query blocks (prefix), while
the local band wastes ``(near_block - 1) / n_local`` of its work (near), hence two sizes.

Queries at an offset: with ``q_offset`` the queries are the last ``L - q_offset`` keys (block
boundaries start at the offset), and ``special`` may replace the flags derived from ``is_sep``.
Context parallelism runs the kernel this way over a key layout ``[remote specials | halo | own
segment]`` (``megatron/attention/context_parallel.py`` explains why the rule is unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from megatron.attention.alibi import AlibiBias
from megatron.attention.sepllm_rule import SepRule, positions_in_document

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def default_blocks(seq_len: int) -> Tuple[int, int]:
    """(prefix_block, near_block): among 128-512 / 64-128 the best (within noise) on CPU at
    n_local 64, 2k-8k; the prefix never needs to be longer than the sequence."""
    return min(256, max(64, 1 << (seq_len - 1).bit_length())), 64


@dataclass
class PrefixBlock:
    """Queries ``[start, end)``; all of them see compact specials ``[lo, hi)`` (may be empty)."""

    start: int
    end: int
    lo: int
    hi: int

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo


@dataclass
class NearBlock:
    """Queries ``[start, end)``: compact specials in ``special_ranges`` (outside the enclosing
    prefix block's range) and original keys ``[local_start, end)``, masked."""

    index: int  # row of ``CompactPlan.near_keep``
    start: int
    end: int
    special_ranges: List[Tuple[int, int]]
    local_start: int

    @property
    def num_keys(self) -> int:
        return sum(b - a for a, b in self.special_ranges) + self.end - self.local_start


@dataclass
class CompactPlan:
    """Everything derived from ``is_sep``/``doc_ids`` once per call (shared by fwd and bwd)."""

    special_idx: torch.Tensor  # [B, S] long, positions of the specials (padded slots point anywhere)
    groups: List[Tuple[PrefixBlock, List[NearBlock]]]
    # [B, n_near, near_block, max keys]: what each query of a near block attends to, its keys
    # ordered as in ``_near_keys`` (special ranges, then the local band), padded.
    near_keep: torch.Tensor
    q_offset: int = 0  # queries are keys [q_offset, L); block bounds are key positions
    _masks: dict = field(default_factory=dict)

    def near_mask(self, blk: NearBlock, dtype: torch.dtype, group: int) -> torch.Tensor:
        """Additive mask [B, 1, group * rows, keys] of a near block (0 = attend, -inf = not)."""
        if (dtype, group) not in self._masks:
            keep = self.near_keep
            mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
            self._masks[(dtype, group)] = mask[:, :, None].expand(-1, -1, group, -1, -1)
        rows = blk.end - blk.start
        mask = self._masks[(dtype, group)][:, blk.index, :, :rows, :blk.num_keys]
        return mask.reshape(mask.shape[0], 1, group * rows, blk.num_keys)


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


class LastInputsCache:
    """Remembers the plan built for the most recent (is_sep, doc_ids, settings): every layer of a
    model step passes the same flags, so the plan is built once per step, not once per layer.
    It holds references to the flag tensors, so identity plus version counter is a safe key."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._value = None

    def get(self, is_sep: torch.Tensor, doc_ids: Optional[torch.Tensor], settings: tuple, build):
        key = (is_sep, is_sep._version, doc_ids, None if doc_ids is None else doc_ids._version, settings)
        old = self._key
        if old is None or not (old[0] is key[0] and old[1] == key[1] and old[2] is key[2]
                               and old[3] == key[3] and old[4] == key[4]):
            self._value, self._key = build(), key
        return self._value


_PLANS = LastInputsCache()


def _is_nondecreasing(x: torch.Tensor) -> bool:
    return bool((x[:, 1:] >= x[:, :-1]).all()) if x.shape[1] > 1 else True


def build_plan(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
               prefix_block: Optional[int] = None, near_block: Optional[int] = None,
               special: Optional[torch.Tensor] = None, q_offset: int = 0) -> CompactPlan:
    """The plan for keys [0, L) and queries [q_offset, L); ``special`` [B, L] overrides the
    initial-or-separator flags otherwise derived from ``is_sep`` and ``rule``."""
    B, L = is_sep.shape
    default_prefix, default_near = default_blocks(L - q_offset)
    prefix_block = prefix_block or default_prefix
    near_block = min(near_block or default_near, prefix_block)
    if prefix_block % near_block:
        raise ValueError(f"prefix_block {prefix_block} must be a multiple of near_block {near_block}")
    dev = is_sep.device
    w = rule.n_local
    docs = doc_ids if (rule.separate_documents and doc_ids is not None) else None
    contiguous_docs = docs is None or _is_nondecreasing(docs)
    special = special_flags(is_sep, rule, docs) if special is None else special.bool()
    idx, pos = gather_specials(special, never_visible=L + w)
    csum0 = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                       torch.cumsum(special.long(), dim=1)], dim=1)  # csum0[:, t + 1] = #specials <= t

    def visible_count(t: torch.Tensor) -> torch.Tensor:
        """[B, n]: query t sees the compact slots below this (specials at positions <= t - w)."""
        return csum0[:, (t - w + 1).clamp(min=0)]

    doc_start = (torch.arange(L, device=dev) - positions_in_document(docs)) if docs is not None else None

    def doc_floor(t: torch.Tensor) -> torch.Tensor:
        """[B, n]: with contiguous documents, slots below this precede query t's document."""
        if docs is None or not contiguous_docs:
            return torch.zeros(B, t.numel(), dtype=torch.long, device=dev)
        return csum0.gather(1, doc_start[:, t])

    # Prefix: the specials every query of the block sees, in every batch row (and document).
    p_start = torch.arange(q_offset, L, prefix_block, device=dev)
    p_last = torch.clamp(p_start + prefix_block, max=L) - 1
    f_lo = doc_floor(p_last).amax(dim=0)
    f_hi = visible_count(p_start).amin(dim=0)
    if not contiguous_docs:
        f_hi = f_lo  # repeated document ids: leave every special to the masked near part
    f_hi = torch.maximum(f_hi, f_lo)

    # Near: whatever the enclosing prefix leaves out of [lo, hi), plus the local band.
    n_start = torch.arange(q_offset, L, near_block, device=dev)
    n_last = torch.clamp(n_start + near_block, max=L) - 1
    parent = (n_start - q_offset) // prefix_block
    lo = doc_floor(n_start).amin(dim=0)
    hi = torch.maximum(visible_count(n_last).amax(dim=0), lo)
    below_end = torch.minimum(hi, f_lo[parent]).clamp(min=lo)  # [lo, below_end)
    above_start = torch.maximum(f_hi[parent], lo)  # [above_start, hi)
    local_start = (n_start - w + 1).clamp(min=0)
    if docs is not None and contiguous_docs:
        local_start = torch.maximum(local_start, doc_start[:, n_start].amin(dim=0))

    groups: List[Tuple[PrefixBlock, List[NearBlock]]] = [
        (PrefixBlock(a, z + 1, fl, fh), []) for a, z, fl, fh in
        zip(p_start.tolist(), p_last.tolist(), f_lo.tolist(), f_hi.tolist())]
    for n, (a, z, par, l0, l1, h0, h1, ls) in enumerate(zip(
            n_start.tolist(), n_last.tolist(), parent.tolist(), lo.tolist(), below_end.tolist(),
            above_start.tolist(), hi.tolist(), local_start.tolist())):
        ranges = [(x, y) for x, y in ((l0, l1), (h0, h1)) if y > x]
        groups[par][1].append(NearBlock(n, a, z + 1, ranges, ls))
    return CompactPlan(idx, groups, _near_keep(pos, idx, docs, w, near_block, n_start, n_last, lo, below_end,
                                               above_start, hi, local_start), q_offset)


def _near_keep(pos: torch.Tensor, idx: torch.Tensor, docs: Optional[torch.Tensor], w: int, near_block: int,
               n_start: torch.Tensor, n_last: torch.Tensor, lo: torch.Tensor, below_end: torch.Tensor,
               above_start: torch.Tensor, hi: torch.Tensor, local_start: torch.Tensor) -> torch.Tensor:
    """Every near block's visibility at once, [B, n_near, near_block, max keys].

    Column c of block n is special slot ``lo + c`` (first range), then ``above_start + c - n1``
    (second range), then the local key ``local_start + c - n1 - n2``; then padding.
    """
    B, L = pos.shape[0], (docs.shape[1] if docs is not None else None)
    dev = pos.device
    n1, n2 = below_end - lo, (hi - above_start).clamp(min=0)
    n_keys = n1 + n2 + (n_last + 1 - local_start)
    col = torch.arange(int(n_keys.max()), device=dev)[None, :]
    in_special = col < (n1 + n2)[:, None]
    in_local = ~in_special & (col < n_keys[:, None])
    slot = torch.where(col < n1[:, None], lo[:, None] + col, above_start[:, None] + col - n1[:, None])
    slot = torch.where(in_special, slot, 0)
    k_pos = (local_start - n1 - n2)[:, None] + col  # meaningful on local columns only
    q_pos = n_start[:, None] + torch.arange(near_block, device=dev)[None, :]  # [n_near, rows]
    n_near, n_cols = slot.shape

    def per_slot(table: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, n_near, cols]
        if table.shape[1] == 0:
            return torch.zeros(B, n_near, n_cols, dtype=table.dtype, device=dev)
        return table.gather(1, slot.reshape(1, -1).expand(B, -1)).view(B, n_near, n_cols)

    see_special = in_special[None, :, None, :] & (per_slot(pos)[:, :, None, :] <= (q_pos - w)[None, :, :, None])
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    see_local = (in_local[:, None, :] & (dist >= 0) & (dist < w))[None]
    keep = see_special | see_local
    if docs is not None:
        def doc_at(positions: torch.Tensor) -> torch.Tensor:  # [B or 1, ...] positions -> doc ids [B, ...]
            flat = positions.clamp(0, L - 1).reshape(positions.shape[0], -1).expand(B, -1)
            return docs.gather(1, flat).view(B, *positions.shape[1:])
        col_doc = torch.where(in_special[None], doc_at(per_slot(idx)), doc_at(k_pos[None]))
        keep = keep & (col_doc[:, :, None, :] == doc_at(q_pos[None])[:, :, :, None])
    return keep


def _fold(x: torch.Tensor, group: int, start: int, end: int) -> torch.Tensor:
    """Query rows of a block [B, Hq, L(, D)] -> [B, Hkv, group * rows(, D)] (a view when group == 1)."""
    blk = x[:, :, start:end]
    return blk if group == 1 else blk.reshape(x.shape[0], x.shape[1] // group, -1, *x.shape[3:])


def _unfold(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, group * rows(, D)] -> [B, Hq, rows(, D)]."""
    return x if group == 1 else x.reshape(x.shape[0], x.shape[1] * group, -1, *x.shape[3:])


def _near_keys(x: torch.Tensor, x_special: torch.Tensor, blk: NearBlock) -> torch.Tensor:
    pieces = [x_special[:, :, a:b] for a, b in blk.special_ranges]
    local = x[:, :, blk.local_start:blk.end]
    return torch.cat(pieces + [local], dim=2) if pieces else local


def _near_key_index(plan: CompactPlan, blk: NearBlock) -> torch.Tensor:
    """[B, keys]: the token index of every key of a near block, in ``_near_keys`` order."""
    idx = plan.special_idx
    local = torch.arange(blk.local_start, blk.end, device=idx.device).expand(idx.shape[0], -1)
    return torch.cat([idx[:, a:b] for a, b in blk.special_ranges] + [local], dim=1)


def _bias_mask(bias: Optional[AlibiBias], start: int, end: int, k_index: torch.Tensor, group: int,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ALiBi of queries [start, end) on keys ``k_index`` [B, keys], folded like the queries:
    [B, Hkv, group * rows, keys] (None without ALiBi)."""
    if bias is None:
        return None
    q_index = torch.arange(start, end, device=k_index.device)[None]
    b = bias.scores(q_index, k_index).to(dtype)  # [B, Hq, rows, keys]
    return b.reshape(b.shape[0], b.shape[1] // group, group * (end - start), b.shape[-1])


def _near_call_mask(plan: CompactPlan, blk: NearBlock, bias: Optional[AlibiBias], dtype: torch.dtype,
                    group: int) -> torch.Tensor:
    mask = plan.near_mask(blk, dtype, group)
    extra = _bias_mask(bias, blk.start, blk.end, _near_key_index(plan, blk), group, dtype)
    return mask if extra is None else mask + extra


def _prefix_call_mask(plan: CompactPlan, pre: PrefixBlock, bias: Optional[AlibiBias], dtype: torch.dtype,
                      group: int) -> Optional[torch.Tensor]:
    return _bias_mask(bias, pre.start, pre.end, plan.special_idx[:, pre.lo:pre.hi], group, dtype)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, H, _, D = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exps and merges for inputs of ``dtype``, as the fused kernel returns them:
    fp32 for 16/32-bit inputs, fp64 for fp64 (an fp32 buffer would cap fp64 at fp32 accuracy)."""
    return torch.promote_types(dtype, torch.float32)


def _merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Softmax over the union of two disjoint key sets from the two partial results."""
    lse = torch.logaddexp(lse1, lse2)
    acc = stats_dtype(o1.dtype)
    out = o1.to(acc) * torch.exp(lse1 - lse)[..., None] + o2.to(acc) * torch.exp(lse2 - lse)[..., None]
    return out.to(o1.dtype), lse


class CompactSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CompactPlan,
                scale: float, bias: Optional[AlibiBias] = None) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        k_special = _gather_rows(k, plan.special_idx)
        v_special = _gather_rows(v, plan.special_idx)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:3], dtype=stats_dtype(q.dtype), device=q.device)
        off = plan.q_offset  # query rows are key positions minus the offset
        for pre, nears in plan.groups:
            for blk in nears:
                a, b = blk.start - off, blk.end - off
                o, l_blk = _flash_fwd(_fold(q, group, a, b), _near_keys(k, k_special, blk),
                                      _near_keys(v, v_special, blk), 0.0, False,
                                      attn_mask=_near_call_mask(plan, blk, bias, q.dtype, group), scale=scale)
                out[:, :, a:b] = _unfold(o, group)
                lse[:, :, a:b] = _unfold(l_blk, group)
            if not pre.empty:
                a, b = pre.start - off, pre.end - off
                o_pre, lse_pre = _flash_fwd(_fold(q, group, a, b), k_special[:, :, pre.lo:pre.hi],
                                            v_special[:, :, pre.lo:pre.hi], 0.0, False,
                                            attn_mask=_prefix_call_mask(plan, pre, bias, q.dtype, group), scale=scale)
                o, l_blk = _merge(o_pre, lse_pre, _fold(out, group, a, b), _fold(lse, group, a, b))
                out[:, :, a:b] = _unfold(o, group)
                lse[:, :, a:b] = _unfold(l_blk, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.bias = plan, scale, bias
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan: CompactPlan = ctx.plan
        bias: Optional[AlibiBias] = ctx.bias
        group = q.shape[1] // k.shape[1]
        k_special = _gather_rows(k, plan.special_idx)
        v_special = _gather_rows(v, plan.special_idx)
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
        dk_special = torch.zeros_like(k_special)
        dv_special = torch.zeros_like(v_special)
        off = plan.q_offset
        for pre, nears in plan.groups:
            for blk in nears:
                a, b = blk.start - off, blk.end - off
                dq_b, dk_b, dv_b = _flash_bwd(
                    _fold(grad_out, group, a, b), _fold(q, group, a, b), _near_keys(k, k_special, blk),
                    _near_keys(v, v_special, blk), _fold(out, group, a, b), _fold(lse, group, a, b), 0.0, False,
                    attn_mask=_near_call_mask(plan, blk, bias, q.dtype, group), scale=ctx.scale)
                dq[:, :, a:b] = _unfold(dq_b, group)
                offset = 0
                for x, y in blk.special_ranges:
                    dk_special[:, :, x:y] += dk_b[:, :, offset:offset + y - x]
                    dv_special[:, :, x:y] += dv_b[:, :, offset:offset + y - x]
                    offset += y - x
                dk[:, :, blk.local_start:blk.end] += dk_b[:, :, offset:]
                dv[:, :, blk.local_start:blk.end] += dv_b[:, :, offset:]
            if not pre.empty:
                a, b = pre.start - off, pre.end - off
                dq_p, dk_p, dv_p = _flash_bwd(
                    _fold(grad_out, group, a, b), _fold(q, group, a, b), k_special[:, :, pre.lo:pre.hi],
                    v_special[:, :, pre.lo:pre.hi], _fold(out, group, a, b), _fold(lse, group, a, b), 0.0, False,
                    attn_mask=_prefix_call_mask(plan, pre, bias, q.dtype, group), scale=ctx.scale)
                dq[:, :, a:b] += _unfold(dq_p, group)
                dk_special[:, :, pre.lo:pre.hi] += dk_p
                dv_special[:, :, pre.lo:pre.hi] += dv_p
        if dk_special.shape[2]:
            # Padded slots carry zero gradient (never attended), so scattering them is harmless.
            index = plan.special_idx[:, None, :, None].expand_as(dk_special)
            dk.scatter_add_(2, index, dk_special)
            dv.scatter_add_(2, index, dv_special)
        return dq, dk, dv, None, None, None


def compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                      rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, plan: Optional[CompactPlan] = None,
                      prefix_block: Optional[int] = None, near_block: Optional[int] = None,
                      bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """Sep-Attention, q [B, Hq, Lq, D], k/v [B, Hkv, L, D], is_sep [B, L] -> [B, Hq, Lq, D].

    The queries are the last ``Lq <= L`` keys (``Lq == L``: ordinary self-attention). ``plan`` may
    be passed in to share it between layers with the same rule and inputs; ``bias`` adds ALiBi (key
    positions are token positions: self-attention only).
    """
    q_offset = k.shape[2] - q.shape[2]
    if q_offset < 0:
        raise ValueError(f"{q.shape[2]} queries but only {k.shape[2]} keys")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if q.device.type != "cpu":
        raise ValueError("attention.impl 'compact' uses PyTorch's CPU flash kernel; use 'flex' on CUDA")
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if plan is None and q_offset:
        plan = build_plan(is_sep, rule, doc_ids, prefix_block, near_block, q_offset=q_offset)
    elif plan is None:
        plan = _PLANS.get(is_sep, doc_ids, (rule, prefix_block, near_block),
                          lambda: build_plan(is_sep, rule, doc_ids, prefix_block, near_block))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return CompactSepAttention.apply(q, k, v, plan, scale, bias)

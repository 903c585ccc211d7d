"""Context parallelism for Sep-Attention, the math: how the sequence is split over the cp ranks,
which keys each rank needs from the others, and the attention of a rank's queries over what it
then holds. There is no communication here (``megatron/parallel/context_parallel.py`` moves the
tensors); every function is a pure function of the *global* separator flags and document ids,
which every cp rank computes from the micro-batch it holds whole. So each rank knows what every
other rank sends it without exchanging metadata, and tests simulate all ranks in one process.

Why shipping the specials is enough. Query ``i`` sees key ``j`` iff ``j <= i`` and (``j`` is
initial, or a separator, or ``i - j < w``) (``sepllm_rule.py``). For a query segment
``[g0, g1)`` every key before ``g0 - (w - 1)`` is outside the window of every query of the
segment, so the only ones it can see are specials (initial or separator tokens). A segment needs
the specials before ``g0 - (w - 1)``, the *halo* ``[g0 - (w - 1), g0)``, and itself.

The local computation. The keys of a segment are laid out as ``[specials | halo | segment]``
(the specials left-padded to the longest batch row) and the queries are the last rows of that
layout. Call a slot's index in the layout its virtual position. Halo and segment are contiguous,
so distances there are the global ones; every slot of the specials part is at virtual distance
``>= w`` from every query (the halo is exactly ``w - 1`` long whenever that part is non-empty).
So, flagging the specials explicitly, the rule on virtual positions sees a special there (same
document permitting) and never a padding slot, exactly as the rule on global positions does:
the compact kernel (``compact.py``, queries at an offset) runs unchanged. The reference path
applies ``visible`` to the global positions themselves.

The split is balanced: the sequence is cut into ``2 cp`` segments and rank ``r`` holds segments
``r`` and ``2 cp - 1 - r`` (Megatron's causal load balancing). With contiguous chunks the last
rank's queries see ``cp`` times more separators than the first's; ``bench/context_parallel.py``
measures this on real text and ``bench/RESULTS.md`` records why the balanced split was chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.attention.compact import CompactPlan, build_plan, compact_attention, gather_specials, special_flags
from megatron.attention.reference import expand_kv_heads
from megatron.attention.sepllm_rule import SepRule, positions_in_document, visible

Segment = Tuple[int, int]  # [start, end) of global positions


def sequence_segments(seq_len: int, cp: int, rank: int, balanced: bool = True) -> List[Segment]:
    """The global positions rank ``rank`` of ``cp`` holds, as ordered, merged ``[start, end)`` ranges.

    Balanced: segments ``rank`` and ``2 cp - 1 - rank`` of ``2 cp`` equal segments (the middle rank's
    two are adjacent and merge); contiguous: segment ``rank`` of ``cp``.
    """
    if cp == 1:
        return [(0, seq_len)]
    parts = 2 * cp if balanced else cp
    if seq_len % parts:
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts} (context parallel size {cp}"
                         f"{', balanced split' if balanced else ''})")
    size = seq_len // parts
    ids = sorted({rank, 2 * cp - 1 - rank}) if balanced else [rank]
    merged: List[List[int]] = []
    for i in ids:
        if merged and merged[-1][1] == i * size:
            merged[-1][1] = (i + 1) * size
        else:
            merged.append([i * size, (i + 1) * size])
    return [(a, b) for a, b in merged]


def take_segments(x: torch.Tensor, segments: List[Segment], dim: int = 1) -> torch.Tensor:
    """The parts of ``x`` (whole sequence along ``dim``) at ``segments``, concatenated."""
    parts = [x.narrow(dim, a, b - a) for a, b in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def owner_maps(seq_len: int, cp: int, balanced: bool = True,
               device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(owner, local)`` [L]: the cp rank holding each position and its index in that rank's chunk."""
    owner = torch.empty(seq_len, dtype=torch.long, device=device)
    local = torch.empty(seq_len, dtype=torch.long, device=device)
    for r in range(cp):
        offset = 0
        for a, b in sequence_segments(seq_len, cp, r, balanced):
            owner[a:b] = r
            local[a:b] = torch.arange(offset, offset + b - a, device=device)
            offset += b - a
    return owner, local


@dataclass
class SegmentKeys:
    """The key layout ``[specials | halo | segment]`` of one query segment ``[start, end)``."""

    start: int
    end: int
    local_start: int  # where the segment's queries start in the rank's chunk
    pool_index: torch.Tensor  # [B, Lk] slot of each key in the rank's pool (0 on padding)
    key_pos: torch.Tensor  # [B, Lk] global position of each key, -1 on padding
    special: torch.Tensor  # [B, Lk] bool: initial or separator (False on padding)
    doc_ids: Optional[torch.Tensor]  # [B, Lk] global document ids (-1 on padding), separate_documents only
    compact_plan: Optional[CompactPlan] = None  # built on first use, shared by the layers with this rule

    @property
    def num_queries(self) -> int:
        return self.end - self.start


@dataclass
class RankPlan:
    """What cp rank ``rank`` sends, receives and computes for one rule (one window size).

    The rank's *pool* of keys is its own chunk followed by the pieces received from each source
    rank in ascending order. A piece holds the positions the receiver needs from that source,
    ascending, padded to the longest batch row (padding slots are never visible).
    """

    rank: int
    seq_len: int
    segments: List[Segment]
    sends: Dict[int, torch.Tensor] = field(default_factory=dict)  # dst -> [B, n] chunk indices (0 on padding)
    send_valid: Dict[int, torch.Tensor] = field(default_factory=dict)  # dst -> [B, n] bool
    recvs: Dict[int, int] = field(default_factory=dict)  # src -> n, ascending src
    keys: List[SegmentKeys] = field(default_factory=list)

    @property
    def chunk_len(self) -> int:
        return sum(b - a for a, b in self.segments)

    def sent_keys(self) -> int:
        """Key slots this rank sends per batch row (padding included)."""
        return sum(t.shape[1] for t in self.sends.values())

    def received_keys(self) -> int:
        return sum(self.recvs.values())


def needed_positions(special: torch.Tensor, segments: List[Segment], halo: int) -> torch.Tensor:
    """[B, L] bool: the keys a rank holding ``segments`` attends to outside its own queries' positions
    (the specials before each segment's halo, and the halo)."""
    B, L = special.shape
    pos = torch.arange(L, device=special.device)
    need = torch.zeros(B, L, dtype=torch.bool, device=special.device)
    for g0, _ in segments:
        halo_start = max(0, g0 - halo)
        need |= special & (pos < halo_start)
        need[:, halo_start:g0] = True
    return need


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, S]: the positions where ``mask`` holds, ascending, each row left-padded with -1."""
    _, right = gather_specials(mask, never_visible=-1)
    S = right.shape[1]
    shift = S - (right >= 0).sum(dim=1, keepdim=True)
    src = torch.arange(S, device=mask.device)[None, :] - shift
    return torch.where(src >= 0, right.gather(1, src.clamp(min=0)), torch.full_like(right, -1))


def build_rank_plans(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor], cp: int,
                     ranks: Optional[List[int]] = None, balanced: bool = True) -> List[RankPlan]:
    """The plans of ``ranks`` (default: all) for ``rule`` (not ``full``), from the global flags
    ``is_sep`` [B, L] and ``doc_ids`` [B, L] (used with ``separate_documents``)."""
    if rule.is_full:
        raise ValueError("full-attention layers run ring attention, not the separator exchange")
    B, L = is_sep.shape
    dev = is_sep.device
    docs = doc_ids if rule.separate_documents else None
    special = special_flags(is_sep, rule, docs)
    halo = rule.n_local - 1
    owner, local = owner_maps(L, cp, balanced, dev)
    segs = [sequence_segments(L, cp, r, balanced) for r in range(cp)]
    ranks = list(range(cp)) if ranks is None else ranks
    # Positions each source sends each destination that a wanted rank deals with, ascending, -1 padded.
    pieces: Dict[Tuple[int, int], torch.Tensor] = {}
    for d in range(cp):
        need = needed_positions(special, segs[d], halo) & (owner != d)
        for s in range(cp):
            if s != d and (s in ranks or d in ranks):
                _, pos = gather_specials(need & (owner == s), never_visible=-1)
                if pos.shape[1]:
                    pieces[(s, d)] = pos
    plans = []
    for r in ranks:
        plan = RankPlan(r, L, segs[r])
        for (s, d), pos in pieces.items():
            if s == r:
                plan.sends[d] = torch.where(pos >= 0, local[pos.clamp(min=0)], torch.zeros_like(pos))
                plan.send_valid[d] = pos >= 0
        incoming = sorted((s, pos) for (s, d), pos in pieces.items() if d == r)
        plan.recvs = {s: pos.shape[1] for s, pos in incoming}
        own = torch.cat([torch.arange(a, b, device=dev) for a, b in segs[r]])
        pool_pos = torch.cat([own.expand(B, -1)] + [pos for _, pos in incoming], dim=1)
        plan.keys = _segment_keys(pool_pos, special, docs, segs[r], halo)
        plans.append(plan)
    return plans


def _segment_keys(pool_pos: torch.Tensor, special: torch.Tensor, docs: Optional[torch.Tensor],
                  segments: List[Segment], halo: int) -> List[SegmentKeys]:
    B, L = special.shape
    dev = special.device
    slot_of = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
    slot_of.scatter_(1, torch.where(pool_pos >= 0, pool_pos, L),
                     torch.arange(pool_pos.shape[1], device=dev).expand(B, -1).contiguous())
    pos = torch.arange(L, device=dev)
    out, offset = [], 0
    for g0, g1 in segments:
        halo_start = max(0, g0 - halo)
        specials = _left_padded_positions(special & (pos < halo_start))
        key_pos = torch.cat([specials, torch.arange(halo_start, g1, device=dev).expand(B, -1)], dim=1)
        real = key_pos >= 0
        at = key_pos.clamp(min=0)
        slot = slot_of.gather(1, at)
        if bool((real & (slot < 0)).any()):
            raise AssertionError("context-parallel plan: a needed key is neither held nor received")
        seg_docs = torch.where(real, docs.gather(1, at), -1) if docs is not None else None
        out.append(SegmentKeys(g0, g1, offset, torch.where(real, slot, 0), key_pos,
                               real & special.gather(1, at), seg_docs))
        offset += g1 - g0
    return out


def _gather_keys(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, P, D] pool, [B, Lk] slots -> [B, H, Lk, D]."""
    B, H, _, D = pool.shape
    return pool.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def reference_segment_mask(seg: SegmentKeys, rule: SepRule, is_sep: torch.Tensor,
                           doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, Lq, Lk] bool: the rule itself (``visible``) on the global positions of the segment's
    queries and keys; padding keys get a position after every query."""
    B, L = is_sep.shape
    real = seg.key_pos >= 0
    at = seg.key_pos.clamp(min=0)
    k_pos = torch.where(real, seg.key_pos, L + rule.n_local)[:, None, :]
    q_pos = torch.arange(seg.start, seg.end, device=is_sep.device)[None, :, None]
    same_doc = k_in_doc = None
    if rule.separate_documents and doc_ids is not None:
        same_doc = doc_ids[:, seg.start:seg.end, None] == doc_ids.gather(1, at)[:, None, :]
        k_in_doc = positions_in_document(doc_ids).gather(1, at)[:, None, :]
    return visible(q_pos, k_pos, is_sep.gather(1, at)[:, None, :], rule.n_init, rule.n_local, k_in_doc, same_doc)


def segment_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: RankPlan,
                      rule: SepRule, is_sep: torch.Tensor, doc_ids: Optional[torch.Tensor], impl: str,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Sep-Attention of this rank's queries q [B, Hq, Lc, D] over its pool of keys k/v [B, Hkv, P, D]
    (own chunk, then the received pieces); ``impl`` 'reference' applies the rule densely, anything
    else runs the compact kernel."""
    outs = []
    for seg in plan.keys:
        q_seg = q[:, :, seg.local_start:seg.local_start + seg.num_queries]
        k, v = _gather_keys(k_pool, seg.pool_index), _gather_keys(v_pool, seg.pool_index)
        if impl == "reference":
            mask = reference_segment_mask(seg, rule, is_sep, doc_ids)[:, None]
            out = F.scaled_dot_product_attention(q_seg, expand_kv_heads(k, q.shape[1]),
                                                 expand_kv_heads(v, q.shape[1]), attn_mask=mask, scale=scale)
        else:
            if seg.compact_plan is None:
                seg.compact_plan = build_plan(seg.special, rule, seg.doc_ids, special=seg.special,
                                              q_offset=seg.key_pos.shape[1] - seg.num_queries)
            out = compact_attention(q_seg, k, v, seg.special, rule, seg.doc_ids, scale, plan=seg.compact_plan)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

"""Causal attention over key blocks merged through their log-sum-exps: the per-step math of ring
attention, which context parallelism runs for full-attention layers (``mode: full``, the hybrid
H/HT/HMT layers, ``impl: sdpa``).

A rank's queries sit in one or two segments of global positions, and so do the keys of the chunk it
holds at a ring step. For each (query segment, key segment) pair the block is skipped (keys after
the queries), unmasked (keys before), causal (the same segment), or masked by the rule's
``visible`` when documents are kept apart. Every block runs PyTorch's fused CPU flash kernel,
which returns the log-sum-exp; the backward of attention over a union of key blocks needs only
the merged output and log-sum-exp, so each block's backward is one fused call too. GQA: key and
value heads are expanded for the call and their gradients summed back per group.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

from megatron.attention.compact import _merge
from megatron.attention.reference import expand_kv_heads
from megatron.attention.sepllm_rule import visible

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# (start, end, offset): global positions [start, end) stored at [offset, offset + end - start) of a chunk.
Placed = Tuple[int, int, int]


def placed(segments: List[Tuple[int, int]]) -> List[Placed]:
    """Segments with their offsets in the chunk that holds them back to back."""
    out, offset = [], 0
    for a, b in segments:
        out.append((a, b, offset))
        offset += b - a
    return out


def block_mask(q_seg: Placed, k_seg: Placed, doc_ids: Optional[torch.Tensor], dtype: torch.dtype):
    """How the queries of ``q_seg`` see the keys of ``k_seg`` under full causal attention:
    None (no key visible), "all", "causal", or an additive mask [B, 1, Lq, Lk] plus the rows that
    see at least one key [B, 1, Lq]."""
    (q0, q1, _), (k0, k1, _) = q_seg, k_seg
    if k0 >= q1:
        return None
    if doc_ids is None and k1 <= q0:
        return "all"
    if doc_ids is None and (k0, k1) == (q0, q1):
        return "causal"
    dev = doc_ids.device if doc_ids is not None else None
    q_pos = torch.arange(q0, q1, device=dev)[None, :, None]
    k_pos = torch.arange(k0, k1, device=dev)[None, None, :]
    same_doc = None if doc_ids is None else doc_ids[:, q0:q1, None] == doc_ids[:, None, k0:k1]
    keep = visible(q_pos, k_pos, torch.ones((), dtype=torch.bool, device=dev), 0, 1, None, same_doc)
    if not bool(keep.any()):
        return None
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return mask[:, None], keep.any(dim=-1)[:, None]


def _rows(x: torch.Tensor, seg: Placed) -> torch.Tensor:
    return x[:, :, seg[2]:seg[2] + seg[1] - seg[0]]


def visible_blocks(q_segs: List[Placed], k_segs: List[Placed], doc_ids: Optional[torch.Tensor],
                   dtype: torch.dtype) -> Iterator[Tuple[Placed, Placed, bool, Optional[torch.Tensor],
                                                         Optional[torch.Tensor]]]:
    """(query segment, key segment, causal, additive mask, rows that see a key) of every block in which
    some query sees some key; mask and rows are None for the unmasked and causal blocks."""
    for qs in q_segs:
        for ks in k_segs:
            kind = block_mask(qs, ks, doc_ids, dtype)
            if kind is None:
                continue
            if isinstance(kind, str):
                yield qs, ks, kind == "causal", None, None
            else:
                yield qs, ks, False, kind[0], kind[1]


def blocks_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segs: List[Placed],
                   k_segs: List[Placed], doc_ids: Optional[torch.Tensor], scale: float,
                   out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the attention of q [B, Hq, Lq, D] over the chunk k/v [B, Hkv, Lk, D] into the running
    ``out`` [B, Hq, Lq, D] and ``lse`` [B, Hq, Lq] (``compact.stats_dtype``, -inf where no key was seen yet)."""
    hq = q.shape[1]
    for qs, ks, causal, mask, rows_seeing in visible_blocks(q_segs, k_segs, doc_ids, q.dtype):
        o, l_blk = _flash_fwd(_rows(q, qs), expand_kv_heads(_rows(k, ks), hq), expand_kv_heads(_rows(v, ks), hq),
                              0.0, causal, attn_mask=mask, scale=scale)
        if mask is not None:  # the kernel reports lse 0 for rows that see nothing
            l_blk = l_blk.masked_fill(~rows_seeing, float("-inf"))
        o_run, l_run = _rows(out, qs), _rows(lse, qs)
        merged, l_new = _merge(o, l_blk, o_run, l_run)
        o_run.copy_(torch.where(torch.isneginf(l_new)[..., None], torch.zeros_like(merged), merged))
        l_run.copy_(l_new)


def blocks_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, q_segs: List[Placed], k_segs: List[Placed],
                    doc_ids: Optional[torch.Tensor], scale: float, dq: torch.Tensor, dk: torch.Tensor,
                    dv: torch.Tensor) -> None:
    """Accumulate the gradients of every visible block of q over the chunk k/v into dq, dk, dv,
    from the merged ``out`` and ``lse`` of the whole attention."""
    hq, hkv = q.shape[1], k.shape[1]
    for qs, ks, causal, mask, _ in visible_blocks(q_segs, k_segs, doc_ids, q.dtype):
        dq_b, dk_b, dv_b = _flash_bwd(
            _rows(grad_out, qs), _rows(q, qs), expand_kv_heads(_rows(k, ks), hq),
            expand_kv_heads(_rows(v, ks), hq), _rows(out, qs), _rows(lse, qs),
            0.0, causal, attn_mask=mask, scale=scale)
        _rows(dq, qs).add_(dq_b)
        if hq != hkv:
            dk_b = dk_b.unflatten(1, (hkv, hq // hkv)).sum(2)
            dv_b = dv_b.unflatten(1, (hkv, hq // hkv)).sum(2)
        _rows(dk, ks).add_(dk_b)
        _rows(dv, ks).add_(dv_b)

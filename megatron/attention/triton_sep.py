"""Sep-Attention as our own FlashAttention-2-style Triton kernels, forward and backward (impl ``triton``).

Query ``i`` sees the specials (initial tokens + separators) at positions ``<= i - n_local``
and the local band ``(i - n_local, i]`` (see ``sepllm_rule.py``; the split is ``compact.py``'s).
The specials are gathered once per call into a compact ``[B, Hkv, S, D]`` buffer; the
visible ones form a run of slots, so per query block a program visits
  (a)+(b) the special tiles ``[n_before[doc start], n_before[last query - n_local + 1])`` --
          the initial tokens are the first slots, the separators preceding the block follow;
  (c)     the local band tiles ``[first query - n_local + 1, last query]``;
and applies the rule's mask only on boundary tiles: a tile every query of the block sees
entirely (computed from the same tables, see ``triton_plan.py``) runs without one. Softmax
is online in fp32 (exp2 with the scale folded in); the base-2 log-sum-exp is saved.

Backward: three kernels, no atomics, deterministic.
  * ``dq``: per query block, the same tile lists as the forward, recomputing P from the lse.
  * ``dkdv_local``: per key tile of the original sequence, the query blocks whose local band
    covers it (``[j, j + n_local)``); it owns its dK/dV rows and writes them.
  * ``dkdv_special``: per tile of special slots, every later query block that sees it
    (``[pos + n_local, end of document)``); it then adds its dK/dV into the slots' original
    rows, read-modify-write. It runs after ``dkdv_local`` on the same stream and each
    position is one slot at most, so no two programs ever touch one row.
Why not FlashAttention-2's single pass with dQ atomics: a special tile is seen by every later
query block, so one program per key tile loops over O(L / BLOCK_M) query blocks while the dQ
rows receive adds from every key tile (atomics on fp32 buffers, non-deterministic sums, a
zeroed fp32 dQ and a cast). Two passes recompute QK^T and dO V^T once more (7 matmuls
instead of 5 for the backward) but are deterministic and atomic-free; which is faster on a
given GPU is a benchmark question (bench/RESULTS.md, OPEN).

GQA: a forward / dq program serves one query head; a dK/dV program serves one key/value
head and loops over its group of query heads, so K/V are never repeated and dK/dV need no
reduction. Inputs may be strided views (the model passes [B, L, H, D] transposed) as long as
the last dim is contiguous. bf16/fp16 inputs use fp32 accumulation; fp32 inputs use IEEE fp32
dots (no TF32) -- that is what the interpreter tests run. Imported only on the triton path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from megatron.attention.sepllm_rule import SepRule
from megatron.kernels.dispatch import interpret_enabled
from megatron.attention.triton_plan import NEVER, SepTilePlan, cached_tile_plan

LOG2E = 1.4426950408889634
_NEVER = tl.constexpr(NEVER)  # padding slot position, as the kernels see it


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b. PRECISION "upcast" (bf16 under the interpreter only, whose tl.dot
    multiplies bf16 bit patterns, triton-lang/triton#11584) does the same product in fp32."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Elements [lo, hi) in aligned tiles of BLOCK: (first tile, first full tile, end of full tiles,
    end); the tiles between the middle two lie inside [full_lo, full_hi)."""
    t_lo = lo // BLOCK
    t_hi = tl.where(hi > lo, (hi + BLOCK - 1) // BLOCK, t_lo)
    f_lo = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK, t_lo), t_hi)
    f_hi = tl.minimum(tl.maximum(full_hi // BLOCK, f_lo), t_hi)
    return t_lo, f_lo, f_hi, t_hi


@triton.jit
def _special_tiles(b, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                   HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK_N: tl.constexpr):
    nb = n_before_ptr + b * (L + 1)
    lo = 0
    full_lo = 0
    if HAS_DOCS:
        rs = run_start_ptr + b * L
        full_lo = tl.load(nb + tl.load(rs + q_last))
        if CONTIGUOUS:
            lo = tl.load(nb + tl.load(rs + m0))
    hi = tl.maximum(tl.load(nb + tl.maximum(q_last - W + 1, 0)), lo)
    full_hi = tl.load(nb + tl.maximum(m0 - W + 1, 0))
    return _tile_range(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _local_tiles(b, m0, q_last, L, W, run_start_ptr,
                 HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK_N: tl.constexpr):
    lo = tl.maximum(m0 - W + 1, 0)
    full_lo = tl.maximum(q_last - W + 1, 0)
    if HAS_DOCS:
        rs = run_start_ptr + b * L
        full_lo = tl.maximum(full_lo, tl.load(rs + q_last))
        if CONTIGUOUS:
            lo = tl.maximum(lo, tl.load(rs + m0))
    return _tile_range(lo, q_last + 1, full_lo, m0 + 1, BLOCK_N)


@triton.jit
def _keep(rows, cols, key_pos_ptr, key_doc_ptr, q_doc, n_keys, W,
          SPECIAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[rows, cols] visibility of a boundary tile (rows are query positions)."""
    col_ok = cols < n_keys
    if SPECIAL:
        k_pos = tl.load(key_pos_ptr + cols, mask=col_ok, other=_NEVER)
        keep = k_pos[None, :] <= rows[:, None] - W
    else:
        dist = rows[:, None] - cols[None, :]
        keep = (dist >= 0) & (dist < W)
    if HAS_DOCS:
        k_doc = tl.load(key_doc_ptr + cols, mask=col_ok, other=-2)
        keep = keep & (k_doc[None, :] == q_doc[:, None])
    return keep


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, k_base, v_base, k_stride, v_stride, t_lo, t_hi, n_keys,
               key_pos_ptr, key_doc_ptr, W, qk_scale,
               SPECIAL: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    dcol = tl.arange(0, BLOCK_D)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n_keys) & (dcol[None, :] < D)
        k = tl.load(k_base + cols[:, None] * k_stride + dcol[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * v_stride + dcol[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if MASKED:
            keep = _keep(rows, cols, key_pos_ptr, key_doc_ptr, q_doc, n_keys, W, SPECIAL, HAS_DOCS)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sep_fwd_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, lse_ptr,
                    spos_ptr, sdoc_ptr, n_before_ptr, doc_ptr, run_start_ptr,
                    L, S, n_q_heads, group, W, qk_scale,
                    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                    HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    io_mask = row_ok[:, None] & (dcol[None, :] < D)
    q = tl.load(q_ptr + b64 * sq_b + h64 * sq_h + rows[:, None] * sq_l + dcol[None, :], mask=io_mask, other=0.0)
    q_last = tl.minimum(m0 + BLOCK_M, L) - 1
    q_doc = rows
    if HAS_DOCS:
        q_doc = tl.load(doc_ptr + b * L + rows, mask=row_ok, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    special_base = (b64 * (n_q_heads // group) + hk64) * S * D  # the gathered buffers are [B, Hkv, S, D]
    ks, vs = ks_ptr + special_base, vs_ptr + special_base
    spos, sdoc = spos_ptr + b * S, sdoc_ptr + b * S
    t_lo, f_lo, f_hi, t_hi = _special_tiles(b, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                                            HAS_DOCS, CONTIGUOUS, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, t_lo, f_lo, S, spos, sdoc, W,
                               qk_scale, True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, f_lo, f_hi, S, spos, sdoc, W,
                               qk_scale, True, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, f_hi, t_hi, S, spos, sdoc, W,
                               qk_scale, True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    kb = k_ptr + b64 * sk_b + hk64 * sk_h
    vb = v_ptr + b64 * sv_b + hk64 * sv_h
    docs = doc_ptr + b * L
    t_lo, f_lo, f_hi, t_hi = _local_tiles(b, m0, q_last, L, W, run_start_ptr, HAS_DOCS, CONTIGUOUS, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, t_lo, f_lo, L, spos, docs, W,
                               qk_scale, False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, f_lo, f_hi, L, spos, docs, W,
                               qk_scale, False, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, f_hi, t_hi, L, spos, docs, W,
                               qk_scale, False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + b64 * so_b + h64 * so_h + rows[:, None] * so_l + dcol[None, :],
             out.to(o_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, m_i + tl.math.log2(l_safe), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward: dQ (per query block, the forward's tile lists)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, k_base, v_base, k_stride, v_stride, t_lo, t_hi, n_keys,
              key_pos_ptr, key_doc_ptr, W, qk_scale,
              SPECIAL: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    dcol = tl.arange(0, BLOCK_D)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n_keys) & (dcol[None, :] < D)
        k = tl.load(k_base + cols[:, None] * k_stride + dcol[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * v_stride + dcol[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if MASKED:
            keep = _keep(rows, cols, key_pos_ptr, key_doc_ptr, q_doc, n_keys, W, SPECIAL, HAS_DOCS)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _sep_dq_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                   spos_ptr, sdoc_ptr, n_before_ptr, doc_ptr, run_start_ptr,
                   L, S, n_q_heads, group, W, qk_scale, sm_scale,
                   sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l,
                   HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    io_mask = row_ok[:, None] & (dcol[None, :] < D)
    q = tl.load(q_ptr + b64 * sq_b + h64 * sq_h + rows[:, None] * sq_l + dcol[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b64 * sdo_b + h64 * sdo_h + rows[:, None] * sdo_l + dcol[None, :], mask=io_mask,
                 other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    q_last = tl.minimum(m0 + BLOCK_M, L) - 1
    q_doc = rows
    if HAS_DOCS:
        q_doc = tl.load(doc_ptr + b * L + rows, mask=row_ok, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    special_base = (b64 * (n_q_heads // group) + hk64) * S * D
    ks, vs = ks_ptr + special_base, vs_ptr + special_base
    spos, sdoc = spos_ptr + b * S, sdoc_ptr + b * S
    t_lo, f_lo, f_hi, t_hi = _special_tiles(b, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                                            HAS_DOCS, CONTIGUOUS, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, t_lo, f_lo, S, spos, sdoc, W, qk_scale,
                   True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, f_lo, f_hi, S, spos, sdoc, W, qk_scale,
                   True, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, f_hi, t_hi, S, spos, sdoc, W, qk_scale,
                   True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    kb = k_ptr + b64 * sk_b + hk64 * sk_h
    vb = v_ptr + b64 * sv_b + hk64 * sv_h
    docs = doc_ptr + b * L
    t_lo, f_lo, f_hi, t_hi = _local_tiles(b, m0, q_last, L, W, run_start_ptr, HAS_DOCS, CONTIGUOUS, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, t_lo, f_lo, L, spos, docs, W, qk_scale,
                   False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, f_lo, f_hi, L, spos, docs, W, qk_scale,
                   False, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, f_hi, t_hi, L, spos, docs, W, qk_scale,
                   False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    tl.store(dq_ptr + b64 * sdq_b + h64 * sdq_h + rows[:, None] * sdq_l + dcol[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dK / dV (per key tile; local band first, then the specials read-modify-write)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dkdv_tiles(dk, dv, k, v, cols, k_pos, k_doc, q_base, do_base, sq_l, sdo_l, lse_base, delta_base,
                doc_base, t_lo, t_hi, L, W, qk_scale,
                SPECIAL: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate this key tile's dK/dV (transposed scores [keys, queries]) over query blocks [t_lo, t_hi)."""
    dcol = tl.arange(0, BLOCK_D)
    for t in range(t_lo, t_hi):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        io_mask = row_ok[:, None] & (dcol[None, :] < D)
        q = tl.load(q_base + rows[:, None] * sq_l + dcol[None, :], mask=io_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_l + dcol[None, :], mask=io_mask, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale
        if MASKED:
            if SPECIAL:
                keep = k_pos[:, None] <= rows[None, :] - W
            else:
                dist = rows[None, :] - cols[:, None]
                keep = (dist >= 0) & (dist < W)
            keep = keep & row_ok[None, :]
            if HAS_DOCS:
                q_doc = tl.load(doc_base + rows, mask=row_ok, other=-1)
                keep = keep & (k_doc[:, None] == q_doc[None, :])
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dv += _dot(p_t.to(do.dtype), do, PRECISION)
        dp_t = _dot(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_group(dk, dv, k, v, cols, k_pos, k_doc, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr,
                b64, hk64, group, n_q_heads, t_lo, f_lo, f_hi, t_hi, L, W, qk_scale,
                sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l,
                SPECIAL: tl.constexpr, HAS_DOCS: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """All query heads of the key/value head's group, boundary blocks masked, full ones not."""
    doc_base = doc_ptr + b64 * L
    for i in range(group):
        h64 = hk64 * group + i
        q_base = q_ptr + b64 * sq_b + h64 * sq_h
        do_base = do_ptr + b64 * sdo_b + h64 * sdo_h
        row_base = (b64 * n_q_heads + h64) * L
        dk, dv = _dkdv_tiles(dk, dv, k, v, cols, k_pos, k_doc, q_base, do_base, sq_l, sdo_l, lse_ptr + row_base,
                             delta_ptr + row_base, doc_base, t_lo, f_lo, L, W, qk_scale,
                             SPECIAL, True, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, cols, k_pos, k_doc, q_base, do_base, sq_l, sdo_l, lse_ptr + row_base,
                             delta_ptr + row_base, doc_base, f_lo, f_hi, L, W, qk_scale,
                             SPECIAL, False, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, cols, k_pos, k_doc, q_base, do_base, sq_l, sdo_l, lse_ptr + row_base,
                             delta_ptr + row_base, doc_base, f_hi, t_hi, L, W, qk_scale,
                             SPECIAL, True, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
    return dk, dv


@triton.jit
def _sep_dkdv_local_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                           doc_ptr, run_end_ptr,
                           L, n_q_heads, group, W, qk_scale, sm_scale,
                           sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l,
                           sdk_b, sdk_h, sdk_l,
                           HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    n_kv_heads = n_q_heads // group
    b64 = (bh // n_kv_heads).to(tl.int64)
    hk64 = (bh % n_kv_heads).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    col_ok = cols < L
    kv_mask = col_ok[:, None] & (dcol[None, :] < D)
    k = tl.load(k_ptr + b64 * sk_b + hk64 * sk_h + cols[:, None] * sk_l + dcol[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * sv_b + hk64 * sv_h + cols[:, None] * sv_l + dcol[None, :], mask=kv_mask, other=0.0)
    k_last = tl.minimum(n0 + BLOCK_N, L) - 1
    # Query q sees key j through the band iff j <= q < j + W (and q is in j's document).
    q_hi = tl.minimum(k_last + W, L)
    full_hi = tl.minimum(n0 + W, L)
    k_doc = cols
    if HAS_DOCS:
        run_end = run_end_ptr + b64 * L
        full_hi = tl.minimum(full_hi, tl.load(run_end + n0))
        if CONTIGUOUS:
            q_hi = tl.minimum(q_hi, tl.load(run_end + k_last))
        k_doc = tl.load(doc_ptr + b64 * L + cols, mask=col_ok, other=-2)
    t_lo, f_lo, f_hi, t_hi = _tile_range(n0, q_hi, k_last, full_hi, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_group(dk, dv, k, v, cols, cols, k_doc, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr,
                         b64, hk64, group, n_q_heads, t_lo, f_lo, f_hi, t_hi, L, W, qk_scale,
                         sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, False, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
    out = b64 * sdk_b + hk64 * sdk_h + cols[:, None] * sdk_l + dcol[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _sep_dkdv_special_kernel(q_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                             spos_ptr, sdoc_ptr, n_before_ptr, doc_ptr, run_end_ptr,
                             L, S, n_q_heads, group, W, qk_scale, sm_scale,
                             sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, sdk_b, sdk_h, sdk_l,
                             HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    s0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    n_kv_heads = n_q_heads // group
    b = bh // n_kv_heads
    b64 = b.to(tl.int64)
    hk64 = (bh % n_kv_heads).to(tl.int64)
    count = tl.load(n_before_ptr + b64 * (L + 1) + L)
    slots = s0 + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    slot_ok = slots < count
    kv_mask = slot_ok[:, None] & (dcol[None, :] < D)
    spos = spos_ptr + b64 * S
    k_pos = tl.load(spos + slots, mask=slot_ok, other=_NEVER)
    special = (b64 * n_kv_heads + hk64) * S * D + slots[:, None] * D + dcol[None, :]
    k = tl.load(ks_ptr + special, mask=kv_mask, other=0.0)
    v = tl.load(vs_ptr + special, mask=kv_mask, other=0.0)
    live = s0 < count
    p_first = tl.load(spos + s0, mask=live, other=_NEVER)
    p_last = tl.load(spos + tl.minimum(s0 + BLOCK_N, count) - 1, mask=live, other=_NEVER)
    # Query q sees special key p iff q >= p + W (and q is in p's document).
    q_lo = tl.minimum(p_first + W, L)
    q_hi = L
    full_hi = L
    k_doc = slots
    if HAS_DOCS:
        run_end = run_end_ptr + b64 * L
        first_end = tl.load(run_end + p_first, mask=live, other=0)
        full_hi = tl.where(first_end > p_last, first_end, 0)  # the tile's keys share one document
        if CONTIGUOUS:
            q_hi = tl.load(run_end + p_last, mask=live, other=0)
        k_doc = tl.load(sdoc_ptr + b64 * S + slots, mask=slot_ok, other=-2)
    t_lo, f_lo, f_hi, t_hi = _tile_range(q_lo, q_hi, tl.minimum(p_last + W, L), full_hi, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_group(dk, dv, k, v, slots, k_pos, k_doc, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr,
                         b64, hk64, group, n_q_heads, t_lo, f_lo, f_hi, t_hi, L, W, qk_scale,
                         sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, True, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
    # Back to the original rows, added to what the local pass wrote there.
    rows = tl.where(slot_ok, k_pos, 0)
    out = b64 * sdk_b + hk64 * sdk_h + rows[:, None] * sdk_l + dcol[None, :]
    dk_old = tl.load(dk_ptr + out, mask=kv_mask, other=0.0).to(tl.float32)
    dv_old = tl.load(dv_ptr + out, mask=kv_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptr + out, (dk_old + dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, (dv_old + dv).to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations and the autograd Function
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel: BLOCK_M query rows x BLOCK_N keys, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shipped configurations, keyed by (kernel, padded head dim, 16-bit inputs). Chosen so that every
# one compiles for sm_80 and sm_90 without register spills (python -m megatron.kernels.aot_check
# --sep-attention; figures in bench/RESULTS.md); their speed on a GPU is still OPEN.
CONFIGS: Dict[Tuple[str, int, bool], KernelConfig] = {
    ("fwd", 64, True): KernelConfig(128, 64, 4, 3),
    ("fwd", 128, True): KernelConfig(128, 64, 8, 3),
    ("fwd", 256, True): KernelConfig(64, 32, 4, 2),
    ("dq", 64, True): KernelConfig(128, 32, 4, 2),
    ("dq", 128, True): KernelConfig(64, 32, 4, 2),
    ("dq", 256, True): KernelConfig(32, 32, 4, 1),
    ("dkdv", 64, True): KernelConfig(32, 128, 4, 2),
    ("dkdv", 128, True): KernelConfig(32, 64, 8, 2),
    ("dkdv", 256, True): KernelConfig(32, 32, 4, 1),
    ("fwd", 64, False): KernelConfig(64, 32, 4, 2),
    ("fwd", 128, False): KernelConfig(64, 32, 4, 2),
    ("fwd", 256, False): KernelConfig(32, 32, 4, 1),
    ("dq", 64, False): KernelConfig(64, 32, 4, 2),
    ("dq", 128, False): KernelConfig(32, 32, 4, 2),
    ("dq", 256, False): KernelConfig(32, 16, 4, 1),
    ("dkdv", 64, False): KernelConfig(32, 64, 4, 2),
    ("dkdv", 128, False): KernelConfig(32, 32, 4, 2),
    ("dkdv", 256, False): KernelConfig(16, 32, 4, 1),
}
MAX_HEAD_DIM = 256


def padded_head_dim(D: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(D))


def kernel_config(kernel: str, D: int, dtype: torch.dtype) -> KernelConfig:
    """The shipped configuration for head dim ``D`` (small dims use the 64 row)."""
    return CONFIGS[(kernel, max(64, padded_head_dim(D)), dtype != torch.float32)]


def dot_precision(dtype: torch.dtype, interpreting: bool = False) -> str:
    """fp32 inputs get IEEE fp32 dots (TF32 would miss the fp64 reference); 16-bit ones ignore it,
    except bf16 in Triton's interpreter, which must upcast (see ``_dot``)."""
    if interpreting and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Launch:
    """What one call needs besides the tensors: rule window, scale and (overridable) tile sizes."""

    window: int
    scale: float
    blocks: Optional[Tuple[int, int]]  # tests: (BLOCK_M, BLOCK_N) for every kernel

    def config(self, kernel: str, D: int, dtype: torch.dtype) -> KernelConfig:
        cfg = kernel_config(kernel, D, dtype)
        if self.blocks is None:
            return cfg
        return KernelConfig(self.blocks[0], self.blocks[1], cfg.num_warps, cfg.num_stages)


def _plan_args(plan: SepTilePlan, ref: torch.Tensor):
    """(special_pos, special_doc, n_before, doc, run_start, run_end); unused tables point at n_before."""
    dummy = plan.n_before
    return (plan.special_pos, plan.special_doc if plan.has_docs else dummy, plan.n_before,
            plan.doc if plan.has_docs else dummy, plan.run_start if plan.has_docs else dummy,
            plan.run_end if plan.has_docs else dummy)


def _gather_specials(x: torch.Tensor, plan: SepTilePlan) -> torch.Tensor:
    B, H, _, D = x.shape
    idx = plan.special_idx[:, None, :, None].expand(B, H, plan.special_idx.shape[1], D)
    return x.gather(2, idx).contiguous()


def _like_model_layout(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Empty [B, H, L, D] stored as [B, L, H, D]: the layout the model reshapes for free."""
    B, H, L, D = x.shape
    return torch.empty(B, L, H, D, dtype=dtype or x.dtype, device=x.device).transpose(1, 2)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def sep_forward(q, k, v, plan: SepTilePlan, launch: Launch):
    B, Hq, L, D = q.shape
    S = plan.special_pos.shape[1]
    group = Hq // k.shape[1]
    ks, vs = _gather_specials(k, plan), _gather_specials(v, plan)
    out = _like_model_layout(q)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    cfg = launch.config("fwd", D, q.dtype)
    spos, sdoc, n_before, doc, run_start, _ = _plan_args(plan, q)
    _sep_fwd_kernel[(triton.cdiv(L, cfg.block_m), B * Hq)](
        q, k, v, ks, vs, out, lse, spos, sdoc, n_before, doc, run_start,
        L, S, Hq, group, launch.window, launch.scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        HAS_DOCS=plan.has_docs, CONTIGUOUS=plan.contiguous_docs, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=padded_head_dim(D), PRECISION=dot_precision(q.dtype, interpret_enabled()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def sep_backward(grad_out, q, k, v, out, lse, plan: SepTilePlan, launch: Launch):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    S = plan.special_pos.shape[1]
    group = Hq // Hkv
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), [B, Hq, L]
    ks, vs = _gather_specials(k, plan), _gather_specials(v, plan)
    dq, dk, dv = _like_model_layout(q), _like_model_layout(k), _like_model_layout(v)
    spos, sdoc, n_before, doc, run_start, run_end = _plan_args(plan, q)
    common = dict(HAS_DOCS=plan.has_docs, CONTIGUOUS=plan.contiguous_docs, D=D, BLOCK_D=padded_head_dim(D),
                  PRECISION=dot_precision(q.dtype, interpret_enabled()))
    qk_scale, W = launch.scale * LOG2E, launch.window

    cfg = launch.config("dq", D, q.dtype)
    _sep_dq_kernel[(triton.cdiv(L, cfg.block_m), B * Hq)](
        q, k, v, ks, vs, grad_out, lse, delta, dq, spos, sdoc, n_before, doc, run_start,
        L, S, Hq, group, W, qk_scale, launch.scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)

    cfg = launch.config("dkdv", D, q.dtype)
    # Pass 1 owns every dK/dV row (each key is in its own query's band); pass 2 adds the specials' share.
    _sep_dkdv_local_kernel[(triton.cdiv(L, cfg.block_n), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, doc, run_end,
        L, Hq, group, W, qk_scale, launch.scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    _sep_dkdv_special_kernel[(triton.cdiv(S, cfg.block_n), B * Hkv)](
        q, ks, vs, grad_out, lse, delta, dk, dv, spos, sdoc, n_before, doc, run_end,
        L, S, Hq, group, W, qk_scale, launch.scale,
        *_strides(q), *_strides(grad_out), *_strides(dk),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    return dq, dk, dv


class TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SepTilePlan,
                launch: Launch) -> torch.Tensor:
        out, lse = sep_forward(q, k, v, plan, launch)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.launch = plan, launch
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = sep_backward(grad_out, q, k, v, out, lse, ctx.plan, ctx.launch)
        return dq, dk, dv, None, None


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_sep_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                         rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, plan: Optional[SepTilePlan] = None,
                         blocks: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Sep-Attention, q [B, Hq, L, D], k/v [B, Hkv, L, D], is_sep [B, L] -> [B, Hq, L, D].

    ``plan`` (``triton_plan.build_tile_plan``) may be shared between layers; by default the plan
    of the most recent flags is reused. ``blocks`` = (BLOCK_M, BLOCK_N) overrides the tile sizes
    of all kernels (tests use small ones so short sequences cross many tiles).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"triton Sep-Attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be [B, Hq, L, D] and [B, Hkv, L, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton Sep-Attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton Sep-Attention needs q, k, v of one dtype among fp32/fp16/bf16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if plan is None:
        plan = cached_tile_plan(is_sep, rule, doc_ids)
    launch = Launch(rule.n_local, q.shape[-1] ** -0.5 if scale is None else float(scale), blocks)
    q, k, v = (_unit_last_dim(t) for t in (q, k, v))
    return TritonSepAttention.apply(q, k, v, plan, launch)

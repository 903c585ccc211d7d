"""The Sep-Attention Triton kernels (impl ``triton``): forward, dQ, dK/dV local band, dK/dV specials.

Launched by ``triton_sep.py`` (which explains the algorithm and the backward's two-pass design);
the tile lists come from ``triton_plan.py``'s per-position tables. Tensors: q [B, Hq, L, D],
k/v [B, Hkv, L, D] with any strides but a unit last one; the gathered specials ks/vs are
contiguous [B, Hkv, S, D]; lse (base 2) and delta are contiguous fp32 [B, Hq, L].

Offsets: Triton passes small ints (L, strides) as int32 and index vectors are int32, so every
product that can pass 2^31 -- a row index times a row stride (512k tokens x 32 heads x 128 is 2^31
already), b x L, b x S, a slot times D -- is formed in int64 where the address is made; comparisons
stay int32. A 64-bit vector kept live through a loop costs registers these kernels do not have, so
the stores recompute theirs. The dK/dV query loop at head dim 256 and in fp32 instead adds int32
offsets inside a tile to the tile's int64 first row (the launcher keeps them below 2^31:
``triton_sep.fits_int32_tile``): there that form spills least, elsewhere the other (ptxas's register
counts, bench/RESULTS.md, Sep-Attention).
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron.attention.triton_plan import NEVER

_NEVER = tl.constexpr(NEVER)  # padding slot position, as the kernels see it


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b (PRECISION: see ``dot_precision``). "upcast" (bf16 under the interpreter
    only, whose tl.dot multiplies bf16 bit patterns, triton-lang/triton#11584) does the same product
    in fp32."""
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
def _special_tiles(b64, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                   HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Special-slot tiles of query block [m0, q_last]: slots [doc floor, #specials <= q_last - W),
    full where every query sees the slot (position <= m0 - W, in q_last's document)."""
    nb = n_before_ptr + b64 * (L + 1)
    lo = 0
    full_lo = 0
    if HAS_DOCS:
        rs = run_start_ptr + b64 * L
        full_lo = tl.load(nb + tl.load(rs + q_last))
        if CONTIGUOUS:
            lo = tl.load(nb + tl.load(rs + m0))
    hi = tl.maximum(tl.load(nb + tl.maximum(q_last - W + 1, 0)), lo)
    full_hi = tl.load(nb + tl.maximum(m0 - W + 1, 0))
    return _tile_range(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _local_tiles(b64, m0, q_last, L, W, run_start_ptr,
                 HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Local-band key tiles of query block [m0, q_last]: keys [m0 - W + 1, q_last], full where every
    query sees the key (q_last - W < key <= m0, in q_last's document)."""
    lo = tl.maximum(m0 - W + 1, 0)
    full_lo = tl.maximum(q_last - W + 1, 0)
    if HAS_DOCS:
        rs = run_start_ptr + b64 * L
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
        cols64 = cols.to(tl.int64)[:, None]
        k = tl.load(k_base + cols64 * k_stride + dcol[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64 * v_stride + dcol[None, :], mask=kv_mask, other=0.0)
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
def sep_fwd_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, lse_ptr,
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
    rows64 = rows.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b64 * sq_b + h64 * sq_h + rows64 * sq_l + dcol[None, :], mask=io_mask, other=0.0)
    q_last = tl.minimum(m0 + BLOCK_M, L) - 1
    q_doc = rows
    if HAS_DOCS:
        q_doc = tl.load(doc_ptr + b64 * L + rows, mask=row_ok, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    special_base = (b64 * (n_q_heads // group) + hk64) * S * D  # the gathered buffers are [B, Hkv, S, D]
    ks, vs = ks_ptr + special_base, vs_ptr + special_base
    spos, sdoc = spos_ptr + b64 * S, sdoc_ptr + b64 * S
    t_lo, f_lo, f_hi, t_hi = _special_tiles(b64, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                                            HAS_DOCS, CONTIGUOUS, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, t_lo, f_lo, S, spos, sdoc, W,
                               qk_scale, True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, f_lo, f_hi, S, spos, sdoc, W,
                               qk_scale, True, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, ks, vs, D, D, f_hi, t_hi, S, spos, sdoc, W,
                               qk_scale, True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    kb = k_ptr + b64 * sk_b + hk64 * sk_h
    vb = v_ptr + b64 * sv_b + hk64 * sv_h
    docs = doc_ptr + b64 * L
    t_lo, f_lo, f_hi, t_hi = _local_tiles(b64, m0, q_last, L, W, run_start_ptr, HAS_DOCS, CONTIGUOUS, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, t_lo, f_lo, L, spos, docs, W,
                               qk_scale, False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, f_lo, f_hi, L, spos, docs, W,
                               qk_scale, False, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, rows, q_doc, kb, vb, sk_l, sv_l, f_hi, t_hi, L, spos, docs, W,
                               qk_scale, False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    rows64 = (m0.to(tl.int64) + tl.arange(0, BLOCK_M))[:, None]  # recomputed, not kept live through the loops
    tl.store(o_ptr + b64 * so_b + h64 * so_h + rows64 * so_l + dcol[None, :],
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
        cols64 = cols.to(tl.int64)[:, None]
        k = tl.load(k_base + cols64 * k_stride + dcol[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64 * v_stride + dcol[None, :], mask=kv_mask, other=0.0)
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
def sep_dq_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
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
    rows64 = rows.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b64 * sq_b + h64 * sq_h + rows64 * sq_l + dcol[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b64 * sdo_b + h64 * sdo_h + rows64 * sdo_l + dcol[None, :], mask=io_mask,
                 other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    q_last = tl.minimum(m0 + BLOCK_M, L) - 1
    q_doc = rows
    if HAS_DOCS:
        q_doc = tl.load(doc_ptr + b64 * L + rows, mask=row_ok, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    special_base = (b64 * (n_q_heads // group) + hk64) * S * D
    ks, vs = ks_ptr + special_base, vs_ptr + special_base
    spos, sdoc = spos_ptr + b64 * S, sdoc_ptr + b64 * S
    t_lo, f_lo, f_hi, t_hi = _special_tiles(b64, m0, q_last, L, W, n_before_ptr, run_start_ptr,
                                            HAS_DOCS, CONTIGUOUS, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, t_lo, f_lo, S, spos, sdoc, W, qk_scale,
                   True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, f_lo, f_hi, S, spos, sdoc, W, qk_scale,
                   True, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, ks, vs, D, D, f_hi, t_hi, S, spos, sdoc, W, qk_scale,
                   True, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)

    kb = k_ptr + b64 * sk_b + hk64 * sk_h
    vb = v_ptr + b64 * sv_b + hk64 * sv_h
    docs = doc_ptr + b64 * L
    t_lo, f_lo, f_hi, t_hi = _local_tiles(b64, m0, q_last, L, W, run_start_ptr, HAS_DOCS, CONTIGUOUS, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, t_lo, f_lo, L, spos, docs, W, qk_scale,
                   False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, f_lo, f_hi, L, spos, docs, W, qk_scale,
                   False, False, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, rows, q_doc, kb, vb, sk_l, sv_l, f_hi, t_hi, L, spos, docs, W, qk_scale,
                   False, True, HAS_DOCS, D, BLOCK_N, BLOCK_D, PRECISION)
    rows64 = (m0.to(tl.int64) + tl.arange(0, BLOCK_M))[:, None]
    tl.store(dq_ptr + b64 * sdq_b + h64 * sdq_h + rows64 * sdq_l + dcol[None, :],
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
    TILE_BASE: tl.constexpr = BLOCK_D >= 256 or q_base.dtype.element_ty == tl.float32  # see the module docstring
    if TILE_BASE:
        q_offs = tl.arange(0, BLOCK_M)[:, None] * sq_l + dcol[None, :]
        do_offs = tl.arange(0, BLOCK_M)[:, None] * sdo_l + dcol[None, :]
    for t in range(t_lo, t_hi):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        io_mask = row_ok[:, None] & (dcol[None, :] < D)
        if TILE_BASE:
            first = tl.cast(t, tl.int64) * BLOCK_M
            q = tl.load(q_base + first * sq_l + q_offs, mask=io_mask, other=0.0)
            do = tl.load(do_base + first * sdo_l + do_offs, mask=io_mask, other=0.0)
        else:
            rows64 = rows.to(tl.int64)[:, None]
            q = tl.load(q_base + rows64 * sq_l + dcol[None, :], mask=io_mask, other=0.0)
            do = tl.load(do_base + rows64 * sdo_l + dcol[None, :], mask=io_mask, other=0.0)
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
def sep_dkdv_local_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
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
    cols64 = cols.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b64 * sk_b + hk64 * sk_h + cols64 * sk_l + dcol[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * sv_b + hk64 * sv_h + cols64 * sv_l + dcol[None, :], mask=kv_mask, other=0.0)
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
    cols64 = (n0.to(tl.int64) + tl.arange(0, BLOCK_N))[:, None]  # recomputed, not kept live through the loops
    out = b64 * sdk_b + hk64 * sdk_h + cols64 * sdk_l + dcol[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def sep_dkdv_special_kernel(q_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr, dkp_ptr, dvp_ptr,
                           spos_ptr, sdoc_ptr, n_before_ptr, doc_ptr, run_end_ptr,
                           L, S, n_q_heads, group, W, qk_scale, sm_scale, chunk_blocks,
                           sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l,
                           HAS_DOCS: tl.constexpr, CONTIGUOUS: tl.constexpr, D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    """dK/dV of one tile of special slots from one chunk of ``chunk_blocks`` query blocks, as fp32
    partials [chunk, B, Hkv, S, D]; the caller sums the chunks and adds them to the original rows."""
    s0 = tl.program_id(0) * BLOCK_N
    chunk = tl.program_id(1)
    bh = tl.program_id(2)
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
    in_tile = tl.arange(0, BLOCK_N)[:, None] * D + dcol[None, :]
    special = (b64 * n_kv_heads + hk64) * S * D + s0.to(tl.int64) * D + in_tile
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
    c_lo = chunk * chunk_blocks  # this program's share of the query blocks (order is kept by clamping)
    c_hi = c_lo + chunk_blocks
    t_lo = tl.minimum(tl.maximum(t_lo, c_lo), c_hi)
    f_lo = tl.minimum(tl.maximum(f_lo, c_lo), c_hi)
    f_hi = tl.minimum(tl.maximum(f_hi, c_lo), c_hi)
    t_hi = tl.minimum(tl.maximum(t_hi, c_lo), c_hi)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_group(dk, dv, k, v, slots, k_pos, k_doc, q_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr,
                         b64, hk64, group, n_q_heads, t_lo, f_lo, f_hi, t_hi, L, W, qk_scale,
                         sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, True, HAS_DOCS, D, BLOCK_M, BLOCK_D, PRECISION)
    # Padding slots (and columns of other rows' padding) stay at the buffer's zeros.
    part = (chunk.to(tl.int64) * tl.num_programs(2) + bh) * S * D + s0.to(tl.int64) * D + in_tile
    tl.store(dkp_ptr + part, dk * sm_scale, mask=kv_mask)
    tl.store(dvp_ptr + part, dv, mask=kv_mask)

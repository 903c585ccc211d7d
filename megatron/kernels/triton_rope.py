"""Rotary embedding for q and k in one Triton launch, forward and backward.

One program per token (b, l) loads that token's cos/sin once and rotates every q head and every k
head (GQA: Hk may differ from Hq), copying the channels past ``rotary_dim`` through. The rotation is
orthogonal, so the backward is the same kernel with sin negated. Imported only on the fused path.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

# Elements of one [heads, channels] tile a program keeps in registers per step of its head loop.
TILE_ELEMENTS = 4096


@triton.jit
def _rotate_token_heads(src, dst, n_heads, src_head_stride, dst_head_stride, cos, sin,
                        HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    """Rotate all heads of one token: src/dst point at the token's first head, cos/sin are [1, BLOCK_HALF]."""
    pair = tl.arange(0, BLOCK_HALF)[None, :]
    if INTERLEAVED:
        first = 2 * pair
        second = 2 * pair + 1
    else:
        first = pair
        second = pair + HALF
    rest = ROT + tl.arange(0, BLOCK_REST)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        head_ok = heads < n_heads
        heads64 = heads.to(tl.int64)  # a strided view's head stride can be as long as L x D
        src_row = src + heads64 * src_head_stride
        dst_row = dst + heads64 * dst_head_stride
        pair_mask = head_ok & (pair < HALF)
        x1 = tl.load(src_row + first, mask=pair_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_row + second, mask=pair_mask, other=0.0).to(tl.float32)
        tl.store(dst_row + first, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=pair_mask)
        tl.store(dst_row + second, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=pair_mask)
        if ROT < D:
            rest_mask = head_ok & (rest < D)
            tl.store(dst_row + rest, tl.load(src_row + rest, mask=rest_mask), mask=rest_mask)


@triton.jit
def _rotary_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                      L, n_q_heads, n_k_heads,
                      q_stride_b, q_stride_l, q_stride_h, k_stride_b, k_stride_l, k_stride_h,
                      cs_stride_b, cs_stride_l,
                      HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                      INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // L
    pos = token % L
    pair = tl.arange(0, BLOCK_HALF)[None, :]
    cs_offset = b * cs_stride_b + pos * cs_stride_l + pair
    cos = tl.load(cos_ptr + cs_offset, mask=pair < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_offset, mask=pair < HALF, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    # Outputs are contiguous [B, L, H, D]; inputs may be strided views (e.g. k sliced out of fused QKV).
    _rotate_token_heads(q_ptr + b * q_stride_b + pos * q_stride_l, q_out_ptr + token * n_q_heads * D,
                        n_q_heads, q_stride_h, D, cos, sin, HALF, ROT, D, INTERLEAVED,
                        BLOCK_H, BLOCK_HALF, BLOCK_REST)
    _rotate_token_heads(k_ptr + b * k_stride_b + pos * k_stride_l, k_out_ptr + token * n_k_heads * D,
                        n_k_heads, k_stride_h, D, cos, sin, HALF, ROT, D, INTERLEAVED,
                        BLOCK_H, BLOCK_HALF, BLOCK_REST)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_blocks(n_q: int, n_k: int, D: int, rotary_dim: int) -> Tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_HALF, BLOCK_REST, num_warps) for one token's [heads, channels] tiles."""
    block_half = triton.next_power_of_2(rotary_dim // 2)
    block_rest = triton.next_power_of_2(max(D - rotary_dim, 1))
    row = 2 * block_half + block_rest
    fits = max(1, TILE_ELEMENTS // row)
    block_h = min(triton.next_power_of_2(max(n_q, n_k)), 1 << (fits.bit_length() - 1))  # both powers of 2
    return block_h, block_half, block_rest, 4 if block_h * row >= 2048 else 2


def launch_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                  interleaved: bool, inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate (or, with ``inverse``, un-rotate) q and k; returns new contiguous tensors."""
    q, k = _last_dim_unit(q), _last_dim_unit(k)
    B, L, n_q, D = q.shape
    n_k = k.shape[2]
    half = rotary_dim // 2
    q_out = torch.empty((B, L, n_q, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, L, n_k, D), dtype=k.dtype, device=k.device)
    if B * L == 0:
        return q_out, k_out
    block_h, block_half, block_rest, num_warps = rotary_blocks(n_q, n_k, D, rotary_dim)
    cs_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rotary_qk_kernel[(B * L,)](
        q, k, q_out, k_out, cos, sin, L, n_q, n_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cs_stride_b, cos.stride(1),
        HALF=half, ROT=rotary_dim, D=D, INTERLEAVED=interleaved, INVERSE=inverse,
        BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=block_rest,
        num_warps=num_warps,
    )
    return q_out, k_out


class RotaryQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.rotary_dim, ctx.interleaved = rotary_dim, interleaved
        return launch_rotary(q, k, cos, sin, rotary_dim, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = launch_rotary(grad_q, grad_k, cos, sin, ctx.rotary_dim, ctx.interleaved, inverse=True)
        return grad_q, grad_k, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, L, H, D] with equal B, L, D")
    B, L, _, D = q.shape
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary: rotary_dim={rotary_dim} must be even and in (0, {D}]")
    want = rotary_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != L or t.shape[2] != want:
            raise ValueError(f"rotary: {name} {tuple(t.shape)} must be [{B} or 1, {L}, {want}]")


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
              interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, cos, sin, rotary_dim)
    cos = _last_dim_unit(cos.detach().to(torch.float32))
    sin = _last_dim_unit(sin.detach().to(torch.float32))
    return RotaryQK.apply(q, k, cos, sin, rotary_dim, interleaved)

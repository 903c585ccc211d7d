"""LayerNorm / RMSNorm with an optional fused residual add, in Triton, forward and backward.

Forward: one program per row; the whole row sits in registers (BLOCK_N = next_power_of_2(N)),
statistics in fp32, mean (LayerNorm) and rstd saved for the backward. With a residual the row sum
x + residual is rounded to its dtype first (as eager does) and written out as the second output.

Backward: a fixed number of programs each walks a strided set of rows, writing d(input) per row and
accumulating d(weight)/d(bias) for its rows in fp32 registers; the per-program partials are then
summed by torch (a [programs, N] buffer, small next to the activations).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from megatron.kernels.dispatch import NORM_MAX_FUSED_COLUMNS as MAX_FUSED_COLUMNS


@triton.jit
def _norm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, sum_ptr, mean_ptr, rstd_ptr,
                     x_row_stride, res_row_stride, N, eps,
                     RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rounded = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * N + cols, rounded, mask=mask)
        x = rounded.to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = tl.rsqrt(var + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
                     x_row_stride, dy_row_stride, dsum_row_stride, M, N,
                     RMS: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """x is the normalised input (the row sum when there was a residual); dx is contiguous [M, N].

    dsum is the gradient arriving at the row-sum output (residual case); it adds to d(input).
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    first_row = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, tl.cdiv(M - pid, n_programs)):
        row = first_row + i * n_programs
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + row * dsum_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(dw_partial_ptr + pid * N + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * N + cols, db_acc, mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride (a view when possible)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def num_warps_for(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(device: torch.device, rows: int) -> int:
    """Programs for the weight-grad reduction: 4 per SM, 4 in all in the interpreter (CPU)."""
    if device.type == "cuda":
        cap = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = 4
    return max(1, min(rows, cap))


class FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], eps: float, rms: bool):
        N = x.shape[-1]
        x2 = _rows(x, N)
        M = x2.shape[0]
        sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        res2 = _rows(residual, N) if residual is not None else None
        row_sum = torch.empty((M, N), dtype=sum_dtype, device=x.device) if residual is not None else None
        y = torch.empty((M, N), dtype=sum_dtype, device=x.device)
        mean = torch.empty(M if not rms else 0, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_n = triton.next_power_of_2(N)
        if M:
            _norm_fwd_kernel[(M,)](
                x2, res2 if res2 is not None else x2, weight, bias if bias is not None else weight,
                y, row_sum if row_sum is not None else y, mean if not rms else rstd, rstd,
                x2.stride(0), res2.stride(0) if res2 is not None else 0, N, eps,
                RMS=rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                num_warps=num_warps_for(block_n),
            )
        ctx.set_materialize_grads(False)  # an unused row-sum output then costs no zero-filled read
        ctx.save_for_backward(row_sum if row_sum is not None else x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.has_residual = rms, bias is not None, residual is not None
        ctx.x_dtype, ctx.shape = x.dtype, x.shape
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        shape = x.shape[:-1] + (N,)
        if residual is None:
            return y.view(shape)
        return y.view(shape), row_sum.view(shape)

    @staticmethod
    def backward(ctx, dy: Optional[torch.Tensor], dsum: Optional[torch.Tensor] = None):
        normed_input, weight, mean, rstd = ctx.saved_tensors
        M, N = normed_input.shape
        if dy is None:
            dy = torch.zeros_like(dsum)
        dy2 = _rows(dy, N)
        dsum2 = _rows(dsum, N) if dsum is not None else None
        dx = torch.empty((M, N), dtype=normed_input.dtype, device=dy.device)
        programs = backward_programs(dy.device, M)
        dw_partial = torch.empty((programs, N), dtype=torch.float32, device=dy.device)
        db_partial = torch.empty((programs, N) if ctx.has_bias else (0,), dtype=torch.float32, device=dy.device)
        block_n = triton.next_power_of_2(N)
        if M:
            _norm_bwd_kernel[(programs,)](
                dy2, normed_input, weight, mean if not ctx.rms else rstd, rstd,
                dsum2 if dsum2 is not None else dy2, dx, dw_partial, db_partial if ctx.has_bias else dw_partial,
                normed_input.stride(0), dy2.stride(0), dsum2.stride(0) if dsum2 is not None else 0, M, N,
                RMS=ctx.rms, HAS_DSUM=dsum2 is not None, HAS_BIAS=ctx.has_bias, BLOCK_N=block_n,
                num_warps=num_warps_for(block_n),
            )
            dweight = dw_partial.sum(0).to(weight.dtype)
            dbias = db_partial.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        else:
            dweight = torch.zeros_like(weight)
            dbias = torch.zeros(N, dtype=ctx.bias_dtype, device=dy.device) if ctx.has_bias else None
        dx = dx.view(ctx.shape)
        dres = dx.to(ctx.res_dtype) if ctx.has_residual else None
        return dx.to(ctx.x_dtype), dweight, dbias, dres, None, None


def norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
         residual: Optional[torch.Tensor], rms: bool) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    N = x.shape[-1]
    if weight.shape != (N,) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"norm: weight/bias must be [{N}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if N > MAX_FUSED_COLUMNS:
        raise ValueError(f"norm: the fused kernel keeps a row in registers, hidden {N} > {MAX_FUSED_COLUMNS}; "
                         "use fused=None (auto) or False")
    weight = weight if weight.is_contiguous() else weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return FusedNorm.apply(x, weight, bias, residual, float(eps), rms)

"""Per-token cross-entropy in Triton that never makes an fp32 copy of the logits.

Forward: one program per row streams the vocabulary in BLOCK_V chunks through an online logsumexp
(running max and rescaled sum in fp32 registers), picks the target logit, and saves the row's lse.
Backward: one program per row streams the vocabulary again and writes
d(logits) = dloss * (softmax - onehot(target)) straight in the logits' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


@triton.jit
def _ce_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, row_stride, V, ignore_index,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # Chunk 0 seeds the running max, so every later rescale factor is finite (no -inf - -inf).
    z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    run_max = tl.max(z, axis=0)
    run_sum = tl.sum(tl.exp(z - run_max), axis=0)
    for start in range(BLOCK_V, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    ignored = target == ignore_index
    target_logit = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target_logit))


@triton.jit
def _ce_bwd_kernel(logits_ptr, targets_ptr, lse_ptr, dloss_ptr, dlogits_ptr, row_stride, dloss_stride, V,
                   ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = dlogits_ptr + row * V
    target = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    dloss = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
    dloss = tl.where(target == ignore_index, 0.0, dloss)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(out_ptr + offs, (grad * dloss).to(dlogits_ptr.dtype.element_ty), mask=mask)


def block_v_for(V: int, block_v: Optional[int]) -> int:
    return block_v if block_v is not None else min(triton.next_power_of_2(V), MAX_BLOCK_V)


def num_warps_for(block_v: int) -> int:
    return min(max(block_v // 512, 1), 8)


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                block_v: Optional[int]) -> torch.Tensor:
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        bv = block_v_for(V, block_v)
        if N:
            _ce_fwd_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index,
                                 BLOCK_V=bv, num_warps=num_warps_for(bv))
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.block_v = ignore_index, bv
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        if N:
            _ce_bwd_kernel[(N,)](logits, targets, lse, dloss, dlogits, logits.stride(0), dloss.stride(0), V,
                                 ctx.ignore_index, BLOCK_V=ctx.block_v, num_warps=num_warps_for(ctx.block_v))
        return dlogits, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  block_v: Optional[int] = None) -> torch.Tensor:
    """``block_v`` overrides the vocabulary chunk (tests use a small one to exercise the streaming loop)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} must be [N, V], targets [N]")
    if block_v is not None and (block_v & (block_v - 1) or block_v <= 0):
        raise ValueError("cross_entropy: block_v must be a power of two")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if not targets.is_contiguous():
        targets = targets.contiguous()
    return FusedCrossEntropy.apply(logits, targets, int(ignore_index), block_v)

"""Cross entropy over vocabulary-parallel logits, without gathering the full vocabulary."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.kernels import fused_cross_entropy
from megatron.parallel.layout import ParallelLayout


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, layout: ParallelLayout):
        vocab_start = layout.tp_rank * logits.shape[-1]
        logits = logits.float()
        lmax = logits.max(dim=-1).values
        if layout.tp_size > 1:
            dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=layout.tp_group)
        shifted = logits - lmax[..., None]
        local = target - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = torch.gather(shifted, -1, local[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if layout.tp_size > 1:
            both = torch.stack((target_logit, sum_exp))
            dist.all_reduce(both, group=layout.tp_group)
            target_logit, sum_exp = both[0], both[1]
        loss = torch.log(sum_exp) - target_logit
        softmax = exp / sum_exp[..., None]
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        onehot_rows = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local[..., None], -onehot_rows[..., None])
        return grad * grad_loss[..., None], None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, layout: ParallelLayout,
                                 fused: Optional[bool] = None) -> torch.Tensor:
    """Per-token loss; ``logits`` [..., V/tp] is this rank's shard, ``target`` holds global ids.
    Unsplit vocabulary (tp == 1): the fused Triton kernel on GPU (``fused``: None = auto), else
    torch's cross entropy; neither keeps an fp32 softmax of the logits for backward."""
    if layout.tp_size == 1:
        return fused_cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   fused=fused).view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, layout)

"""Optimizer construction and gradient clipping that is correct under TP and PP."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.distributed as dist

from megatron.config.schema import Config
from megatron.parallel import get_state


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """No weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    p = cfg.optimizer.params
    groups = param_groups(model, cfg.training.weight_decay)
    kwargs = dict(lr=p.lr, betas=tuple(p.betas), eps=p.eps, foreach=False)
    # Both 'adam' and 'adamw' mean decoupled weight decay, as NeoX's "Adam" does.
    return torch.optim.AdamW(groups, **kwargs)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of the full model's gradient: TP shards summed across TP ranks, replicated
    parameters counted once, pipeline stages summed. Tied-embedding copies count once."""
    st = get_state()
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "pipeline_duplicate", False):
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if hasattr(p, "tensor_parallel_dim") or st.tp_rank == 0:
            total += sq
    if st.tp_size > 1:
        dist.all_reduce(total, group=st.tp_group)
    if st.pp_size > 1:
        dist.all_reduce(total, group=st.pp_group)
    return math.sqrt(float(total))


def clip_grad_norm_(params: List[torch.nn.Parameter], max_norm: float) -> float:
    norm = global_grad_norm(params)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm

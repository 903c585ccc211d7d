"""Optimizer construction, gradient clipping that is correct under TP and PP, and the optimizer state
keyed by parameter name (the checkpoint format: any layout's resharding needs no parameter order).

Named state: ``{"param_groups": [{<hyperparameters>, "params": [names]}], "state": {name: {"step",
"exp_avg", "exp_avg_sq"}}}`` with tensors shaped like this rank's shard of each parameter.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List

import torch
import torch.distributed as dist

from megatron.config.schema import Config
from megatron.parallel import ParallelLayout

NamedState = Dict[str, Any]


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


def named_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> NamedState:
    """The optimizer's state dict with parameters named instead of numbered."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, state = [], {}
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            if p in optimizer.state:
                state[names[id(p)]] = {k: (v.clone() if torch.is_tensor(v) else v)
                                       for k, v in optimizer.state[p].items()}
    return {"param_groups": groups, "state": state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                               named: NamedState) -> None:
    """Load a named state into ``optimizer`` (hyperparameters group by group, state by name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, ids = {}, []
    for group in optimizer.param_groups:
        ids.append([])
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            ids[-1].append(index[names[id(p)]])
    groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": gid}
              for saved, gid in zip(named["param_groups"], ids)]
    state = {index[name]: st for name, st in named["state"].items() if name in index}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def global_grad_norm(params: Iterable[torch.nn.Parameter], layout: ParallelLayout) -> float:
    """L2 norm of the full model's gradient: TP shards summed across TP ranks, replicated
    parameters counted once, pipeline stages summed. Tied-embedding copies count once."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "pipeline_duplicate", False):
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if hasattr(p, "tensor_parallel_dim") or layout.tp_rank == 0:
            total += sq
    if layout.tp_size > 1:
        dist.all_reduce(total, group=layout.tp_group)
    if layout.pp_size > 1:
        dist.all_reduce(total, group=layout.pp_group)
    return math.sqrt(float(total))


def clip_grad_norm_(params: List[torch.nn.Parameter], max_norm: float, layout: ParallelLayout) -> float:
    norm = global_grad_norm(params, layout)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm

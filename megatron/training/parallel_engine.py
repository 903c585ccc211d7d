"""One training iteration under any TP x PP x DP layout, shared by the Trainer, tests and benchmarks.

``build_engine`` returns a :class:`DenseEngine` (gradients averaged over data-parallel ranks with one
flat all-reduce, DDP semantics; pipeline schedule when pp > 1) or, when
``zero_optimization.stage > 0``, a ZeRO engine on DeepSpeed (``megatron.training.zero``, imported
only then). Both expose ``train_step(micro_batches, lr)``, ``forward_backward``, ``eval_loss`` and
``checkpoint_optimizer`` / ``load_optimizer_state`` for layout-independent optimizer checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.parallel import get_state
from megatron.parallel.layout import zero_stage
from megatron.parallel.data_parallel import (allreduce_gradients, allreduce_sequence_parallel_grads,
                                             allreduce_tied_embedding_grads)
from megatron.training.optimizer import clip_grad_norm_
from megatron.training.pipeline import pipeline_runner

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


class DenseEngine:
    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: AutocastFactory = contextlib.nullcontext):
        self.cfg, self.model, self.optimizer, self.device, self.autocast = cfg, model, optimizer, device, autocast
        self.state = get_state()
        self.pipeline = pipeline_runner(model, cfg, device, cfg.training.gradient_accumulation_steps, autocast)

    def forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Accumulates the gradient of mean(loss over micro-batches); returns that mean (this rank)."""
        if self.pipeline is not None:
            return self.pipeline.forward_backward(micro_batches)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                loss = self.model(mb[:, :-1], mb[:, 1:])
            (loss / len(micro_batches)).backward()
            total += loss.detach().float()
        return total / len(micro_batches)

    def reduce_gradients(self, params: List[torch.nn.Parameter]) -> None:
        allreduce_sequence_parallel_grads(self.model)
        if self.state.dp_size > 1:
            allreduce_gradients(params, self.state.dp_group)
        allreduce_tied_embedding_grads(self.model)

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> Dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.reduce_gradients(params)
        loss = average_over_dp(loss)
        grad_norm = clip_grad_norm_(params, self.cfg.training.clip_grad)
        self.optimizer.step()
        return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Mean loss of this rank's micro-batches (not averaged over data-parallel ranks)."""
        if self.pipeline is not None:
            return self.pipeline.evaluate(micro_batches)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                total += self.model(mb[:, :-1], mb[:, 1:]).float()
        return total / len(micro_batches)

    def checkpoint_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The object whose ``state_dict()`` goes into ``optim_tpXX_ppYY.pt`` (collective for ZeRO)."""
        return self.optimizer

    def load_optimizer_state(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


def average_over_dp(value: torch.Tensor) -> torch.Tensor:
    st = get_state()
    if st.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=st.dp_group)
        value /= st.dp_size
    return value


def build_engine(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: AutocastFactory = contextlib.nullcontext):
    if zero_stage(cfg) > 0:
        from megatron.training.zero import ZeroEngine

        return ZeroEngine(cfg, model, optimizer, device, autocast)
    return DenseEngine(cfg, model, optimizer, device, autocast)

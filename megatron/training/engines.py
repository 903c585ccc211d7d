"""One training iteration under any layout, behind one protocol shared by the Trainer, tests and
benchmarks.

:func:`build_engine` returns a :class:`DenseEngine` (gradients averaged over data-parallel ranks with
one flat all-reduce, DDP semantics), a :class:`PipelineEngine` (the same, with the micro-batches run
through the pipeline schedule) or, when ``zero_optimization.stage > 0``, a ZeRO engine on DeepSpeed
(``megatron.training.zero``, imported only then). Every engine implements :class:`Engine`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Protocol

import torch

from megatron.model import micro_batch_loss
from megatron.parallel.data_parallel import (
    allreduce_gradients,
    allreduce_sequence_parallel_grads,
    allreduce_tied_embedding_grads,
    average_over_dp,
)
from megatron.training.guards import non_finite_reason, skip_step
from megatron.training.loss_scaler import LossScaler
from megatron.training.optimizer import NamedState, clip_grad_norm_, load_named_optimizer_state, named_optimizer_state
from megatron.training.pipeline import PipelineRunner
from megatron.training.profiling import nvtx_range

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


class Engine(Protocol):
    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> Dict[str, float]:
        """One optimizer step over this rank's micro-batches [B, L + 1]; returns loss (mean over
        micro-batches and data-parallel ranks), lr and grad_norm."""

    def eval_loss(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Mean loss over this rank's micro-batches and the data-parallel ranks, forward only."""

    def optimizer_state(self) -> NamedState:
        """This model shard's optimizer state keyed by parameter name (collective under ZeRO)."""

    def load_optimizer_state(self, state: NamedState) -> None:
        """Restore what ``optimizer_state`` returned (from any data-parallel layout)."""


class DenseEngine:
    """Every rank holds whole (TP-sharded) parameters and the full optimizer state."""

    observe_gradients: Optional[Callable[[], None]] = None

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 clip_grad: float, autocast: AutocastFactory = contextlib.nullcontext,
                 loss_scaler: Optional[LossScaler] = None):
        self.model, self.optimizer, self.device, self.clip_grad = model, optimizer, device, clip_grad
        self.autocast, self.layout = autocast, model.layout
        self.loss_scaler = loss_scaler  # fp16 (megatron/training/loss_scaler.py); None otherwise

    @staticmethod
    def full_grad(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """``p``'s reduced, unscaled gradient while ``observe_gradients`` runs."""
        return p.grad

    def _forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        """Accumulates the gradient of mean(loss over micro-batches); returns that mean (this rank)."""
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self.autocast():
                loss = micro_batch_loss(self.model, mb.to(self.device))
            scaled = loss if self.loss_scaler is None else self.loss_scaler.scale_loss(loss)
            (scaled / len(micro_batches)).backward()
            total += loss.detach().float()
        return total / len(micro_batches)

    def _forward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self.autocast():
                total += micro_batch_loss(self.model, mb.to(self.device)).float()
        return total / len(micro_batches)

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> Dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with nvtx_range("forward-backward"):
            loss = self._forward_backward(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        with nvtx_range("gradient reduction"):
            allreduce_sequence_parallel_grads(self.model)
            allreduce_gradients(params, self.layout)
            allreduce_tied_embedding_grads(self.model)
        # fp16: unscale, agree on overflow over all ranks (loss_scaler.py); an overflow skips the step below.
        overflow = self.loss_scaler is not None and self.loss_scaler.unscale_and_check(params)
        if self.observe_gradients is not None and not overflow:
            self.observe_gradients()  # optional per-parameter logs (norm_stats.py): reduced, not yet clipped
        grad_norm = float("inf") if overflow else clip_grad_norm_(params, self.clip_grad, self.layout)
        stats = {"loss": float(average_over_dp(loss, self.layout)), "lr": lr, "grad_norm": grad_norm}
        if self.loss_scaler is not None:
            stats.update(self.loss_scaler.update(overflow))
        reason = non_finite_reason(stats["loss"], grad_norm)  # same on every rank: both are reduced
        if reason:
            return skip_step(self.optimizer, stats, reason)  # no update (megatron/training/guards.py)
        with nvtx_range("optimizer step"):
            self.optimizer.step()
        return stats

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        return average_over_dp(self._forward(micro_batches), self.layout)

    def optimizer_state(self) -> NamedState:
        state = named_optimizer_state(self.optimizer, self.model)
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_optimizer_state(self, state: NamedState) -> None:
        scaler_state = state.get("loss_scaler")
        load_named_optimizer_state(self.optimizer, self.model, state)
        if self.loss_scaler is not None and scaler_state is not None:
            self.loss_scaler.load_state_dict(scaler_state)


class PipelineEngine(DenseEngine):
    """A dense engine whose micro-batches run through the pipeline schedule (1F1B, GPipe, interleaved);
    the loss comes from the last stage and is broadcast to the whole pipeline."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 clip_grad: float, schedule: str, n_microbatches: int,
                 autocast: AutocastFactory = contextlib.nullcontext, loss_scaler: Optional[LossScaler] = None):
        super().__init__(model, optimizer, device, clip_grad, autocast, loss_scaler)
        self.pipeline = PipelineRunner(model, schedule, device, n_microbatches, autocast)

    def _forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        if self.loss_scaler is not None:
            self.pipeline.loss_scale = self.loss_scaler.scale
        return self.pipeline.forward_backward(micro_batches)

    def _forward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        return self.pipeline.evaluate(micro_batches)


def build_engine(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: AutocastFactory = contextlib.nullcontext) -> Engine:
    clip = cfg.training.clip_grad
    if cfg.parallel.zero_optimization.stage > 0:
        from megatron.training.zero import ZeroEngine

        return ZeroEngine(cfg, model, optimizer, device, autocast)  # DeepSpeed scales fp16 itself
    scaler = LossScaler.from_config(cfg.training.fp16) if cfg.training.precision == "fp16" else None
    if model.layout.pp_size > 1:
        return PipelineEngine(model, optimizer, device, clip, cfg.parallel.pipe_schedule,
                              cfg.training.gradient_accumulation_steps, autocast, scaler)
    return DenseEngine(model, optimizer, device, clip, autocast, scaler)

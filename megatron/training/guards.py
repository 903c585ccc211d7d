"""Non-finite guard: a step whose loss or gradient norm is NaN/inf makes no update, is counted and logged.

The loss and gradient norm an engine reports are already reduced over every rank (loss averaged
over data-parallel ranks and broadcast from the last pipeline stage; gradient norm summed over TP and
PP after the DP all-reduce), so every rank takes the same decision with no extra communication.

* Engines call :func:`non_finite_reason` before ``optimizer.step()`` and, when it names a reason,
  :func:`skip_step` instead of stepping. ``skip_step`` is the one way to skip an update, fp16 overflow
  steps included (their gradient norm is infinite). An overflow the dynamic loss scaler adapted to
  (``fp16_overflow`` 1 in the stats) is routine: counted, logged, but not toward ``max_skipped_steps``.
* The Trainer feeds every step's stats to :class:`NonFiniteGuard`, which counts skipped steps, logs
  each one, and raises :class:`TrainingDiverged` after ``max_skipped_steps`` consecutive ones.
* :func:`non_finite_state` checks weights and optimizer state before a checkpoint is written, so
  nothing non-finite is ever saved.

A skipped step still consumes its batch and advances the iteration (and so the learning-rate
schedule), as Megatron does for fp16 overflow steps: a bad batch is passed over, not retried.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

SKIPPED = "skipped"  # 1.0 in the stats of a skipped step, 0.0 otherwise
SKIP_REASON = "skip_reason"  # a string; the guard removes it before the stats are logged


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights: the run stops with exit code 3."""


def non_finite_reason(loss: float, grad_norm: Optional[float]) -> Optional[str]:
    """Why this step must not update the weights, or None when loss and gradient norm are finite."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    return None


def skip_step(optimizer: Optional[torch.optim.Optimizer], stats: Dict[str, Any], reason: str) -> Dict[str, Any]:
    """Skip this step's update: gradients are dropped and ``optimizer.step()`` is not called (weights,
    moments and the step count stay as they were). Returns ``stats`` marked as skipped, with ``reason``."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    return {**stats, SKIPPED: 1.0, SKIP_REASON: reason}


class NonFiniteGuard:
    """Counts skipped steps; stops the run after ``max_skipped_steps`` consecutive ones."""

    def __init__(self, max_skipped_steps: int, log: Callable[[str], None] = print):
        self.max_skipped_steps = max_skipped_steps
        self.log = log
        self.consecutive = 0
        self.total = 0
        self.streak_start: Optional[int] = None
        self.last_checkpoint: Optional[str] = None  # the Trainer records its saves here

    @property
    def in_skip_streak(self) -> bool:
        """The last step was skipped: its weights are not worth a checkpoint yet."""
        return self.consecutive > 0

    def after_step(self, iteration: int, stats: Dict[str, Any]) -> Dict[str, Any]:
        """Count and log a skipped step; raise TrainingDiverged at the limit. Returns the stats to log
        (reason removed; ``skipped`` and the running ``skipped_steps`` total added)."""
        reason = stats.pop(SKIP_REASON, None)
        if not stats.get(SKIPPED):
            self.consecutive, self.streak_start = 0, None
            stats[SKIPPED] = 0.0
            stats["skipped_steps"] = float(self.total)
            return stats
        self.total += 1
        stats["skipped_steps"] = float(self.total)
        if stats.get("fp16_overflow"):  # routine for dynamic loss scaling: the scaler adapted; not a failure
            self.log(f"iter {iteration:6d} | fp16 overflow: step skipped, scaler adapted "
                     f"({self.total} skipped in total)")
            return stats
        self.consecutive += 1
        if self.streak_start is None:
            self.streak_start = iteration
        self.log(f"iter {iteration:6d} | step skipped, weights not updated: {reason} "
                 f"({self.consecutive} in a row of at most {self.max_skipped_steps}, {self.total} in total)")
        if self.consecutive >= self.max_skipped_steps:
            last = (f"the last checkpoint saved by this run is {self.last_checkpoint}" if self.last_checkpoint
                    else "this run saved no checkpoint")
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps (iterations {self.streak_start}-"
                f"{iteration}) had a non-finite loss or gradient norm (last: {reason}); stopped without "
                f"saving ({last}). Lower the learning rate or raise max_skipped_steps, then resume")
        return stats


def _floating_tensors(model: torch.nn.Module, optimizer_state: Optional[Dict[str, Any]]
                      ) -> Iterable[Tuple[str, torch.Tensor]]:
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point():
            yield f"weight {name}", t
    for index, state in ((optimizer_state or {}).get("state") or {}).items():
        for key, t in state.items():
            if torch.is_tensor(t) and t.is_floating_point():
                yield f"optimizer state '{key}' of parameter #{index}", t


@torch.no_grad()
def non_finite_state(model: torch.nn.Module, optimizer_state: Optional[Dict[str, Any]],
                     device: torch.device) -> Optional[str]:
    """None when this rank's weights and optimizer state are finite on every rank (collective when
    distributed), else what is not (naming a tensor of this rank, or "another rank's shard")."""
    named = list(_floating_tensors(model, optimizer_state))
    flags = [torch.isfinite(t).all() for _, t in named]
    local_ok = bool(torch.stack(flags).all()) if flags else True
    bad = torch.tensor(0 if local_ok else 1, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not int(bad):
        return None
    if local_ok:
        return "another rank's shard has non-finite values"
    first = next(name for (name, _), ok in zip(named, flags) if not bool(ok))
    return f"{first} has non-finite values"

"""fp16 training with loss scaling: the ``fp16`` section of DeepSpeed / GPT-NeoX.

Mixed precision, AMP style: weights, gradients and optimizer state stay fp32 and the forward and
backward run under fp16 autocast (the Trainer's autocast). What fp16 needs on top is loss scaling,
which the dense and pipeline engines get from :class:`LossScaler` (``engines.py`` calls it at one point):

1. backward runs on ``loss * scale`` so small gradients survive fp16 activations;
2. after the gradient reductions, :meth:`LossScaler.unscale_and_check` divides the gradients by the
   scale and looks for inf/nan; the verdict is all-reduced (MAX) over every rank of the job (tensor-,
   pipeline-, data- and any other parallel group), so all ranks skip or step together;
3. on overflow the optimizer step is skipped: weights and Adam moments stay as they were;
4. :meth:`LossScaler.update` adjusts the scale with DeepSpeed's DynamicLossScaler rule (the ZeRO
   engine, where DeepSpeed scales itself, therefore behaves the same):
   * overflow: with hysteresis left (> 1), spend one unit of it; otherwise halve the scale, not below
     ``min_loss_scale``;
   * no overflow: after ``loss_scale_window`` consecutive good steps the next good step doubles the
     scale and refills the hysteresis.
   ``loss_scale > 0`` is a static scale: it never changes.

Step stats (what ``train_step`` returns and the trainer logs): ``loss_scale`` (for the next step),
``skipped_steps`` (overflow-skipped steps so far) and ``fp16_overflow``: 1 when this step overflowed and
the scaler adapted (lowered the scale or spent hysteresis). That is routine for dynamic scaling and must
not count as a failed step. An overflow the scaler cannot adapt to (static scale, or the minimum scale
reached with no hysteresis left, where DeepSpeed stops the run) is skipped too but reported with
``fp16_overflow`` 0 and an infinite ``grad_norm``, so a non-finite-step guard counts it.

The scaler's state is part of the engine's optimizer state (``state_dict`` / ``load_state_dict``), so a
resumed run continues with the same scale.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
import torch.distributed as dist


class LossScaler:
    """Static (``loss_scale > 0``) or dynamic loss scaling with DeepSpeed's semantics."""

    def __init__(self, loss_scale: float = 0.0, initial_scale_power: int = 16, loss_scale_window: int = 1000,
                 hysteresis: int = 2, min_loss_scale: float = 1.0):
        self.dynamic = loss_scale == 0
        self.scale = float(2 ** initial_scale_power) if self.dynamic else float(loss_scale)
        self.window, self.hysteresis, self.min_scale = loss_scale_window, hysteresis, float(min_loss_scale)
        self.hysteresis_left = hysteresis
        self.iteration = 0  # steps seen (overflowing or not)
        self.last_overflow = -1  # iteration of the last overflow
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, fp16) -> "LossScaler":
        """From the schema's ``Fp16Config`` (``cfg.training.fp16``)."""
        return cls(fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
                   fp16.min_loss_scale)

    # ------------------------------------------------------------------ the step
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_and_check(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale; True when any gradient on any rank is inf or nan."""
        grads: List[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        for dtype_device, group in _by_dtype_and_device(grads).items():
            found_here = torch.zeros(1, dtype=torch.float32, device=dtype_device[1])
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv_scale.to(dtype_device[1]))
            found = torch.maximum(found, found_here.to(device))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item() > 0)

    def update(self, overflow: bool) -> Dict[str, float]:
        """Adjust the scale after a step; returns the step stats (see the module docstring)."""
        adapted = False
        if overflow:
            self.skipped_steps += 1
            if self.dynamic:
                if self.hysteresis_left > 1:
                    self.hysteresis_left -= 1
                    adapted = True
                elif self.scale > self.min_scale:
                    self.scale = max(self.scale / 2.0, self.min_scale)
                    adapted = True
            self.last_overflow = self.iteration
        elif self.dynamic:
            good_before = self.iteration - self.last_overflow - 1
            if good_before > 0 and good_before % self.window == 0:
                self.hysteresis_left = self.hysteresis
                self.scale *= 2.0
        self.iteration += 1
        return {"loss_scale": self.scale, "skipped_steps": float(self.skipped_steps),
                "fp16_overflow": 1.0 if adapted else 0.0}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "iteration": self.iteration,
                "last_overflow": self.last_overflow, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state (a static scaler of the ZeRO engine saves only the scale and skipped steps)."""
        self.scale = float(state.get("scale", self.scale))
        self.hysteresis_left = int(state.get("hysteresis_left", self.hysteresis_left))
        self.iteration = int(state.get("iteration", self.iteration))
        self.last_overflow = int(state.get("last_overflow", self.last_overflow))
        self.skipped_steps = int(state.get("skipped_steps", self.skipped_steps))


def _by_dtype_and_device(grads: List[torch.Tensor]) -> Dict[tuple, List[torch.Tensor]]:
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    return groups


def log_suffix(stats: Dict[str, float]) -> str:
    """`` | loss scale S | skipped N`` for the training log line when fp16 loss scaling is on."""
    if "loss_scale" not in stats:
        return ""
    return f" | loss scale {stats['loss_scale']:.0f} | skipped {stats.get('skipped_steps', 0):.0f}"

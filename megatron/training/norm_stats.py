"""GPT-NeoX's optional per-parameter logs and its gradient noise scale, exact under every layout.

* ``log_param_norm``: ``parameter_norms/NAME`` (and the total ``param_norm`` in the log line);
* ``log_grad_norm``: ``gradient_norms/NAME``; ``log_grad_pct_zeros``: ``pct_grad_zeros/NAME`` (per cent of
  exact zeros). Gradients are read after the data-parallel reduction and fp16 unscaling, before
  clipping, on the iterations that are logged;
* ``log_optimizer_states``: ``optimizer_state_norms/NAME_exp_avg`` and ``..._exp_avg_sq``;
* ``log_gradient_noise_scale``: ``noise_scale`` (McCandlish et al. 2018's B_simple, as NeoX estimates it:
  the gradient of one global batch is B_small, the mean over ``gradient_noise_scale_n_batches``
  consecutive ones is B_big, both squared norms smoothed by an exponential moving average).

NeoX reads each rank's own shard; here every figure is of the whole parameter, as on one rank: a
tensor-parallel shard contributes its part of the sum, a replicated tensor is counted once (tensor-parallel
rank 0), the last stage's copy of a tied embedding not at all, and only data- and context-parallel rank 0
contributes. Per-parameter sums meet in one ``all_gather_object``, the noise scale's in one all-reduce:
both are collective, so every rank calls them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.parallel import ParallelLayout
from megatron.training.guards import SKIPPED

Named = Iterable[Tuple[str, torch.nn.Parameter]]


def counted(p: torch.nn.Parameter, layout: ParallelLayout) -> bool:
    """Whether this rank's copy of ``p`` enters a whole-model sum (see the module docstring)."""
    if layout.dp_rank != 0 or layout.cp_rank != 0 or getattr(p, "pipeline_duplicate", False):
        return False
    return hasattr(p, "tensor_parallel_dim") or layout.tp_rank == 0


def gather_sums(local: Dict[str, List[float]]) -> Dict[str, List[float]]:
    """Per-name sums over every rank (collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: List[Optional[Dict[str, List[float]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    total: Dict[str, List[float]] = {}
    for part in parts:
        for name, values in (part or {}).items():
            total[name] = [a + b for a, b in zip(total[name], values)] if name in total else list(values)
    return total


def _sumsq(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).sum())


def parameter_norms(named: Named, layout: ParallelLayout) -> Dict[str, float]:
    """``parameter_norms/NAME`` for every parameter, and the total ``param_norm``. Collective."""
    sums = gather_sums({n: [_sumsq(p)] for n, p in named if counted(p, layout)})
    out = {f"parameter_norms/{n}": math.sqrt(v[0]) for n, v in sorted(sums.items())}
    out["param_norm"] = math.sqrt(sum(v[0] for v in sums.values()))
    return out


def gradient_sums(named: Named, layout: ParallelLayout, norms: bool, zeros: bool,
                  grad_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]]) -> Dict[str, List[float]]:
    """This rank's share of [sum of squares, zeros, elements] of every gradient. ``grad_of`` is the
    engine's (under ZeRO a collective that assembles the partitions: called for every parameter)."""
    out = {}
    for n, p in named:
        g = grad_of(p)
        if g is not None and counted(p, layout):
            g = g.detach()
            out[n] = [_sumsq(g) if norms else 0.0, float((g == 0).sum()) if zeros else 0.0, float(g.numel())]
    return out


def gradient_metrics(local: Dict[str, List[float]], norms: bool, zeros: bool) -> Dict[str, float]:
    """``gradient_norms/NAME`` and ``pct_grad_zeros/NAME`` from every rank's ``gradient_sums``. Collective."""
    out = {}
    for n, (sq, nz, numel) in sorted(gather_sums(local).items()):
        if norms:
            out[f"gradient_norms/{n}"] = math.sqrt(sq)
        if zeros:
            out[f"pct_grad_zeros/{n}"] = 100.0 * nz / numel
    return out


def optimizer_state_norms(state: Dict[str, Dict[str, torch.Tensor]], params: Dict[str, torch.nn.Parameter],
                          layout: ParallelLayout) -> Dict[str, float]:
    """``optimizer_state_norms/NAME_KEY`` of a named optimizer state (``exp_avg``, ``exp_avg_sq``). Collective."""
    local = {}
    for n, entries in state.items():
        p = params.get(n)
        if p is None or not counted(p, layout):
            continue
        for key, value in entries.items():
            if key != "step" and torch.is_tensor(value) and value.dim() > 0:
                local[f"{n}_{key}"] = [_sumsq(value)]
    return {f"optimizer_state_norms/{k}": math.sqrt(v[0]) for k, v in sorted(gather_sums(local).items())}


def _ema(avg: Optional[float], beta: float, value: float, i: int) -> Tuple[float, float]:
    """(new running average, its bias-corrected value): NeoX's smoothing of the two estimates."""
    avg = beta * (avg or 0.0) + (1 - beta) * value
    return avg, avg / (1 - beta ** (i + 1))


class GradientNoiseScale:
    """NeoX's simple noise scale B_simple = tr(Sigma) / |G|^2 from the gradients of consecutive steps."""

    def __init__(self, layout: ParallelLayout, batch_size: int, n_batches: int, device: torch.device,
                 cpu_offload: bool = False, beta: float = 0.99):
        self.layout, self.device = layout, device
        self.b_small, self.b_big, self.n_batches = batch_size, batch_size * n_batches, n_batches
        self.buffer_device = torch.device("cpu") if cpu_offload else device
        self.beta = beta
        self.buffer: Optional[torch.Tensor] = None
        self.ema_scale: Optional[float] = None
        self.ema_noise: Optional[float] = None
        self.noise_scale: Optional[float] = None
        self.n_updates = 0

    def flat_grad(self, named: Named) -> torch.Tensor:
        """This rank's counted gradients, flattened (taken before clipping)."""
        grads = [p.grad.detach().float().reshape(-1).to(self.buffer_device) for _, p in named
                 if p.grad is not None and counted(p, self.layout)]
        return torch.cat(grads) if grads else torch.zeros(0, device=self.buffer_device)

    def _global_sums(self, *values: float) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t.cpu().tolist()

    def update(self, grad: torch.Tensor) -> None:
        """One finite step's gradient (every rank, the same steps)."""
        self.buffer = grad if self.buffer is None else self.buffer + grad
        if self.n_updates % self.n_batches == self.n_batches - 1:
            big = self.buffer / self.n_batches
            self.buffer = None
            g_big, g_small = self._global_sums(float(big.pow(2).sum()), float(grad.pow(2).sum()))
            noise = (self.b_big * g_big - self.b_small * g_small) / (self.b_big - self.b_small)
            scale = (g_small - g_big) / (1 / self.b_small - 1 / self.b_big)
            self.ema_noise, noise = _ema(self.ema_noise, self.beta, noise, self.n_updates)
            self.ema_scale, scale = _ema(self.ema_scale, self.beta, scale, self.n_updates)
            self.noise_scale = scale / noise
        self.n_updates += 1


class OptionalLogs:
    """The trainer's side of the keys above: gradients observed inside the engine's step, everything
    collected (collectively) on the iterations that are logged."""

    def __init__(self, cfg, model: torch.nn.Module, engine, global_batch: int, device: torch.device):
        lg = cfg.logging
        self.model, self.engine, self.layout = model, engine, model.layout
        self.param_norm, self.optimizer_states = lg.log_param_norm, lg.log_optimizer_states
        self.grad_norm, self.grad_zeros = lg.log_grad_norm, lg.log_grad_pct_zeros
        self.noise = (GradientNoiseScale(self.layout, global_batch, lg.gradient_noise_scale_n_batches, device,
                                         lg.gradient_noise_scale_cpu_offload)
                      if lg.log_gradient_noise_scale else None)
        self.enabled = any((self.param_norm, self.optimizer_states, self.grad_norm, self.grad_zeros, self.noise))
        self.logging_step = False
        self._grad_sums: Dict[str, List[float]] = {}
        self._pending: Optional[torch.Tensor] = None
        if self.grad_norm or self.grad_zeros or self.noise:
            engine.observe_gradients = self.on_gradients  # the noise scale is refused under ZeRO

    def on_gradients(self) -> None:
        named = list(self.model.named_parameters())
        if self.logging_step and (self.grad_norm or self.grad_zeros):
            self._grad_sums = gradient_sums(named, self.layout, self.grad_norm, self.grad_zeros,
                                            self.engine.full_grad)
        if self.noise is not None:
            self._pending = self.noise.flat_grad(named)

    def after_step(self, stats: Dict[str, float]) -> None:
        """Feeds the noise scale with a step that updated the model (the same decision on every rank)."""
        if self.noise is not None and self._pending is not None:
            if not stats.get(SKIPPED):
                self.noise.update(self._pending)
            self._pending = None

    def collect(self) -> Dict[str, float]:
        """Every configured figure of this iteration (collective: every rank calls it)."""
        out: Dict[str, float] = {}
        if self.param_norm:
            out.update(parameter_norms(self.model.named_parameters(), self.layout))
        if self.grad_norm or self.grad_zeros:
            out.update(gradient_metrics(self._grad_sums, self.grad_norm, self.grad_zeros))
            self._grad_sums = {}
        if self.optimizer_states:
            state = self.engine.optimizer_state()["state"]
            out.update(optimizer_state_norms(state, dict(self.model.named_parameters()), self.layout))
        if self.noise is not None and self.noise.noise_scale is not None:
            out["noise_scale"] = self.noise.noise_scale
        return out

    @staticmethod
    def text(stats: Dict[str, float]) -> str:
        parts = [f"param_norm {stats['param_norm']:.3f}"] if "param_norm" in stats else []
        if "noise_scale" in stats:
            parts.append(f"noise_scale {stats['noise_scale']:.4g}")
        return "".join(f" | {p}" for p in parts)

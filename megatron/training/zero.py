"""ZeRO stage 1/2 through DeepSpeed (imported only when ``zero_optimization.stage > 0``).

``deepspeed.initialize`` gets our model and our AdamW, and a DeepSpeed config built from ours as
GPT-NeoX does: micro batch, accumulation steps, gradient clipping, and the typed
``zero_optimization`` section (only the keys that are set). The model's layout is handed over as the
``mpu`` so ZeRO partitions over the data-parallel group only and sums the gradient norm across
tensor-parallel shards (layers mark shards ``tensor_model_parallel``).

Checkpoints stay layout-independent: ``optimizer_state`` gathers every parameter's full AdamW state
(collective over data-parallel ranks) into the same named state the dense engine writes, and
``load_optimizer_state`` scatters such a state back into the partitions. Model weights must be
loaded before the engine is built (ZeRO copies them into its fp32 partitions).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron.model import micro_batch_loss
from megatron.parallel import ParallelLayout
from megatron.parallel.data_parallel import average_over_dp, replica_group, sequence_parallel_params
from megatron.parallel.mappings import sum_over_tp
from megatron.training.guards import non_finite_reason, skip_step
from megatron.training.optimizer import NamedState, param_groups


class ProcessGroupsForDeepSpeed:
    """The ``mpu`` interface DeepSpeed queries (Megatron names), backed by a ParallelLayout."""

    def __init__(self, layout: ParallelLayout):
        self.st = layout

    def get_model_parallel_rank(self) -> int:
        return self.st.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.st.tp_size

    def get_model_parallel_group(self):
        return self.st.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    # Under context parallelism ZeRO partitions and averages over data- x context-parallel ranks:
    # the parameters are replicated over both (megatron/parallel/data_parallel.py: replica_group).
    def get_data_parallel_rank(self) -> int:
        return self.st.dp_rank * self.st.cp_size + self.st.cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.st.dp_size * self.st.cp_size

    def get_data_parallel_group(self):
        return replica_group(self.st)


def deepspeed_config(cfg) -> Dict[str, Any]:
    tr = cfg.training
    return {
        "train_micro_batch_size_per_gpu": tr.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "gradient_clipping": tr.clip_grad,
        "zero_optimization": {k: v for k, v in dataclasses.asdict(cfg.parallel.zero_optimization).items()
                              if v is not None},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": tr.precision == "bf16"},
        # fp16: DeepSpeed keeps fp32 master weights and scales the loss itself, with these settings.
        "fp16": {**dataclasses.asdict(tr.fp16), "enabled": tr.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class ZeroEngine:
    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        import deepspeed

        self.model, self.device, self.autocast, self.layout = model, device, autocast, model.layout
        if self.layout.pp_size > 1:
            raise ValueError("ZeRO with pipeline parallelism is not supported")
        # The decay / no-decay groups of our optimizer, by parameter name, for the named state.
        self._group_names: List[List[str]] = []
        names = {id(p): n for n, p in model.named_parameters()}
        for group in param_groups(model, cfg.training.weight_decay):
            self._group_names.append([names[id(p)] for p in group["params"]])
        self._params = dict(model.named_parameters())
        # DeepSpeed owns the gradient reduction, so the TP sum of sequence-parallel gradients happens
        # per micro-batch, in a hook that runs before ZeRO's accumulation hooks (no params: no SP).
        for p in sequence_parallel_params(model):
            p.register_hook(lambda g: sum_over_tp(g, self.layout))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg),
            mpu=ProcessGroupsForDeepSpeed(self.layout), dist_init_required=False)
        self.base_optimizer = optimizer  # torch AdamW, now over ZeRO's flat fp32 partitions

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> Dict[str, float]:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        skipped_before = self.engine.skipped_steps
        for i, mb in enumerate(micro_batches):
            with self.autocast():
                loss = micro_batch_loss(self.engine, mb.to(self.device))
            total += loss.detach().float()
            if i == len(micro_batches) - 1:  # before the boundary step: the reduced mean loss
                reduced = average_over_dp(total / len(micro_batches), self.layout)
                # A non-finite mean makes this rank's gradients non-finite too, so DeepSpeed's overflow
                # check skips the update on every rank (non-finite guard), even where this rank's own
                # gradients came out finite. Multiplying by exactly 1.0 otherwise, with no host sync.
                loss = loss * torch.where(torch.isfinite(reduced), 1.0, float("nan")).to(loss.dtype)
            self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
            if i == len(micro_batches) - 1 and self.observe_gradients is not None:
                self.observe_gradients()  # reduced at the boundary, not yet clipped or stepped
            self.engine.step()  # reduce-scatter, clip and update at the accumulation boundary
        mean_loss = float(reduced)
        norm = self.engine.get_global_grad_norm()
        stats = {"loss": mean_loss, "lr": lr, "grad_norm": float(norm) if norm is not None else 0.0}
        if self.engine.fp16_enabled():
            stats.update(self._fp16_stats())
        reason = non_finite_reason(mean_loss, stats["grad_norm"])
        if reason or self.engine.skipped_steps > skipped_before:  # DeepSpeed already dropped the update
            return skip_step(None, stats, reason or "DeepSpeed skipped the step (gradient overflow)")
        return stats

    observe_gradients: Optional[Callable[[], None]] = None

    def full_grad(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The whole (unscaled) gradient of ``p`` from ZeRO's partitions. Collective (data-parallel group)."""
        from deepspeed.utils import safe_get_full_grad

        grad = safe_get_full_grad(p)
        if grad is not None and self.engine.fp16_enabled():
            grad = grad / self.optimizer.loss_scale
        return grad

    def _fp16_stats(self) -> Dict[str, float]:
        """DeepSpeed's loss scale and skipped steps, as the dense engine reports them (loss_scaler.py)."""
        overflow = bool(getattr(self.optimizer, "overflow", False))
        dynamic = bool(getattr(self.optimizer.loss_scaler, "dynamic", False))
        stats = {"loss_scale": float(self.optimizer.loss_scale), "skipped_steps": float(self.engine.skipped_steps),
                 "fp16_overflow": 1.0 if overflow and dynamic else 0.0}
        if overflow:
            stats["grad_norm"] = float("inf")
        return stats

    # Our LossScaler's state keys -> DeepSpeed's DynamicLossScaler attributes: one checkpoint format for
    # both engines, so fp16 runs resume across the dense and ZeRO engines.
    _SCALER_FIELDS = {"scale": "cur_scale", "hysteresis_left": "cur_hysteresis", "iteration": "cur_iter",
                      "last_overflow": "last_overflow_iter"}

    def _scaler_state(self) -> Dict[str, Any]:
        scaler = self.optimizer.loss_scaler
        state = {ours: getattr(scaler, theirs) for ours, theirs in self._SCALER_FIELDS.items()
                 if hasattr(scaler, theirs)}
        return {**state, "skipped_steps": self.engine.skipped_steps}

    def _load_scaler_state(self, state: Dict[str, Any]) -> None:
        scaler = self.optimizer.loss_scaler
        for ours, theirs in self._SCALER_FIELDS.items():
            if ours in state and hasattr(scaler, theirs):
                setattr(scaler, theirs, state[ours])
        self.engine.skipped_steps = int(state.get("skipped_steps", 0))

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self.autocast():
                total += micro_batch_loss(self.model, mb.to(self.device)).float()
        return average_over_dp(total / len(micro_batches), self.layout)

    def _step_count(self) -> torch.Tensor:
        for st in self.base_optimizer.state.values():
            if "step" in st:
                return torch.as_tensor(st["step"]).detach().clone()
        return torch.tensor(0.0)

    def _relink_optimizer_state(self) -> None:
        # DeepSpeed links each parameter's view of the optimizer state right after stepping the
        # first param group, before the later groups have state, and never again: with our two
        # groups (decay / no decay) the second group stays unlinked. Link all groups now.
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def optimizer_state(self) -> NamedState:
        """Full per-parameter AdamW state, keyed by name. Collective (data-parallel group)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        has_state = len(self.base_optimizer.state) > 0
        if has_state:
            self._relink_optimizer_state()
        step = self._step_count()
        state: Dict[str, Dict[str, Any]] = {}
        groups = []
        for names, hyper in zip(self._group_names, self.base_optimizer.param_groups):
            for name in names if has_state else ():
                p = self._params[name]
                state[name] = {"step": step.clone(),
                               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().clone(),
                               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone()}
            groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": list(names)})
        named = {"param_groups": groups, "state": state}
        if self.engine.fp16_enabled():
            named["loss_scaler"] = self._scaler_state()
        return named

    def load_optimizer_state(self, named: NamedState) -> None:
        """Scatter a named (full, per-parameter) optimizer state into ZeRO's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        for hyper, saved in zip(self.base_optimizer.param_groups, named["param_groups"]):
            hyper.update({k: v for k, v in saved.items() if k != "params"})
        if self.engine.fp16_enabled() and named.get("loss_scaler"):
            self._load_scaler_state(named["loss_scaler"])
        if not named["state"]:
            return
        step = next(iter(named["state"].values()))["step"]
        for flat in self.optimizer.single_partition_of_fp32_groups:
            self.base_optimizer.state[flat] = {"step": torch.as_tensor(step).clone().float(),
                                               "exp_avg": torch.zeros_like(flat),
                                               "exp_avg_sq": torch.zeros_like(flat)}
        self._relink_optimizer_state()
        for name, saved in named["state"].items():
            p = self._params.get(name)
            if p is not None:
                safe_set_full_optimizer_state(p, saved["exp_avg"], "exp_avg")
                safe_set_full_optimizer_state(p, saved["exp_avg_sq"], "exp_avg_sq")

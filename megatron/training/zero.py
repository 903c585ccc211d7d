"""ZeRO stage 1/2 through DeepSpeed (imported only when ``zero_optimization.stage > 0``).

``deepspeed.initialize`` gets our model and our AdamW, and a DeepSpeed config built from ours as
GPT-NeoX does: micro batch, accumulation steps, gradient clipping, and the ``zero_optimization``
section passed through unchanged. Our process groups are handed over as the ``mpu`` so ZeRO
partitions over the data-parallel group only and sums the gradient norm across tensor-parallel
shards (layers mark shards ``tensor_model_parallel``).

Checkpoints stay layout-independent: ``checkpoint_optimizer`` gathers every parameter's full AdamW
state (collective over data-parallel ranks) into the torch AdamW ``state_dict`` format that the
non-ZeRO path writes, and ``load_optimizer_state`` scatters such a state back into the partitions.
Model weights must be loaded before the engine is built (ZeRO copies them into its fp32 partitions).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List

import torch

from megatron.parallel import get_state
from megatron.parallel.data_parallel import sequence_parallel_params
from megatron.parallel.layout import zero_stage
from megatron.parallel.mappings import sum_over_tp
from megatron.training.optimizer import param_groups
from megatron.training.parallel_engine import AutocastFactory, average_over_dp


class ProcessGroupsForDeepSpeed:
    """The ``mpu`` interface DeepSpeed queries (Megatron names), backed by our ParallelState."""

    def __init__(self):
        self.st = get_state()

    def get_model_parallel_rank(self) -> int:
        return self.st.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.st.tp_size

    def get_model_parallel_group(self):
        return self.st.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.st.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.st.dp_size

    def get_data_parallel_group(self):
        return self.st.dp_group


def deepspeed_config(cfg) -> Dict[str, Any]:
    tr = cfg.training
    return {
        "train_micro_batch_size_per_gpu": tr.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "gradient_clipping": tr.clip_grad,
        "zero_optimization": dict(cfg.parallel.zero_optimization),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": tr.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class _SavedOptimizerState:
    """What ``save_checkpoint`` needs from an optimizer: a ready ``state_dict()``."""

    def __init__(self, state_dict: Dict[str, Any]):
        self._sd = state_dict

    def state_dict(self) -> Dict[str, Any]:
        return self._sd


class ZeroEngine:
    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: AutocastFactory = contextlib.nullcontext):
        import deepspeed

        self.cfg, self.model, self.device, self.autocast = cfg, model, device, autocast
        self.state = get_state()
        if self.state.pp_size > 1:
            raise ValueError("ZeRO with pipeline parallelism is not supported")
        self.stage = zero_stage(cfg)
        # Parameter order of our optimizer's state dict (decayed first), for checkpoint conversion.
        self._param_order: List[List[torch.nn.Parameter]] = [
            g["params"] for g in param_groups(model, cfg.training.weight_decay)]
        # DeepSpeed owns the gradient reduction, so the TP sum of sequence-parallel gradients happens
        # per micro-batch, in a hook that runs before ZeRO's accumulation hooks (no params: no SP).
        for p in sequence_parallel_params(model):
            p.register_hook(sum_over_tp)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg), mpu=ProcessGroupsForDeepSpeed(),
            dist_init_required=False)
        self.base_optimizer = optimizer  # torch AdamW, now over ZeRO's flat fp32 partitions

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> Dict[str, float]:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                loss = self.engine(mb[:, :-1], mb[:, 1:])
            self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
            self.engine.step()  # reduce-scatter, clip and update at the accumulation boundary
            total += loss.detach().float()
        loss = average_over_dp(total / len(micro_batches))
        norm = self.engine.get_global_grad_norm()
        return {"loss": float(loss), "lr": lr, "grad_norm": float(norm) if norm is not None else 0.0}

    def forward_backward(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("with ZeRO, use train_step (DeepSpeed owns backward and reduction)")

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                total += self.model(mb[:, :-1], mb[:, 1:]).float()
        return total / len(micro_batches)

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

    def checkpoint_optimizer(self) -> _SavedOptimizerState:
        """Full per-parameter AdamW state in torch's ``state_dict`` layout. Collective (DP group)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        has_state = len(self.base_optimizer.state) > 0
        if has_state:
            self._relink_optimizer_state()
        step = self._step_count()
        state: Dict[int, Dict[str, Any]] = {}
        groups = []
        index = 0
        for params, hyper in zip(self._param_order, self.base_optimizer.param_groups):
            ids = []
            for p in params:
                if has_state:
                    state[index] = {"step": step.clone(),
                                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().clone(),
                                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone()}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": ids})
        return _SavedOptimizerState({"state": state, "param_groups": groups})

    def load_optimizer_state(self, state_dict: Dict[str, Any]) -> None:
        """Scatter a full (torch AdamW layout) optimizer state into ZeRO's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        for hyper, saved in zip(self.base_optimizer.param_groups, state_dict["param_groups"]):
            hyper.update({k: v for k, v in saved.items() if k != "params"})
        if not state_dict["state"]:
            return
        step = next(iter(state_dict["state"].values()))["step"]
        for flat in self.optimizer.single_partition_of_fp32_groups:
            self.base_optimizer.state[flat] = {"step": torch.as_tensor(step).clone().float(),
                                               "exp_avg": torch.zeros_like(flat),
                                               "exp_avg_sq": torch.zeros_like(flat)}
        self._relink_optimizer_state()
        index = 0
        for params in self._param_order:
            for p in params:
                saved = state_dict["state"].get(index)
                if saved is not None:
                    safe_set_full_optimizer_state(p, saved["exp_avg"], "exp_avg")
                    safe_set_full_optimizer_state(p, saved["exp_avg_sq"], "exp_avg_sq")
                index += 1


def load_zero_optimizer_state(engine: ZeroEngine, load: str) -> None:
    """Resume: this rank's (full, torch-layout) optimizer shard into the ZeRO partitions."""
    from megatron.checkpointing.checkpoint import read_manifest, resolve_checkpoint_dir, shard_name

    ckpt = resolve_checkpoint_dir(load)
    if not read_manifest(ckpt).get("has_optimizer"):
        return
    st = get_state()
    engine.load_optimizer_state(torch.load(ckpt / shard_name("optim", st.tp_rank, st.pp_rank),
                                           map_location="cpu", weights_only=False))

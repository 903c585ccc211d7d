"""NeoX's ``eval_tasks`` in a training config: lm-eval through our harness at every ``eval_interval``.

The logging rank evaluates the whole model as it is at that iteration, alone: with tensor or pipeline
parallelism every model-parallel shard (data- and context-parallel rank 0) is first gathered there and
merged as a checkpoint is merged (``checkpointing/reshard.py``); with data parallelism only, its own
model is the whole model. The other ranks wait for it at their next collective. Scoring is eval.py's
(``runner.lm_for_model``, fp32, batch size 8, no bootstrap), so the numbers equal ``eval.py`` on a
checkpoint saved at that iteration with the same ``--limit`` and ``--bootstrap-iters 0``.

Metrics are named as NeoX names them, ``TASK_METRIC`` (``docs_cloze_acc``): ``valid/TASK_METRIC`` in
metrics.jsonl, ``validation/TASK_METRIC`` in tensorboard and wandb.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from megatron.checkpointing.checkpoint import shard_metadata
from megatron.checkpointing.reshard import TIED_COPY, _merge_tp
from megatron.evaluation.runner import EvalSettings, evaluate, lm_for_model, quiet_lm_eval, scalar_metrics
from megatron.model import build_model


def gather_whole_model(trainer) -> Optional[torch.nn.Module]:
    """The whole model on the logging rank (None elsewhere). Collective when tp x pp > 1."""
    layout = trainer.layout
    if layout.tp_size * layout.pp_size == 1:
        return trainer.model if trainer.is_logger else None
    holder = layout.dp_rank == 0 and layout.cp_rank == 0
    part = None
    if holder:
        state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        part = (layout.tp_rank, state, shard_metadata(trainer.model))
    dst = trainer.world - 1 if layout.pp_size > 1 else 0
    parts = [None] * trainer.world if trainer.is_logger else None
    dist.gather_object(part, parts, dst=dst)
    if not trainer.is_logger:
        return None
    tied = not trainer.cfg.model.no_weight_tying
    shards: Dict[str, list] = {}
    tp_dims: Dict[str, Optional[int]] = {}
    for tp_rank, state, meta in sorted((p for p in parts if p is not None), key=lambda p: p[0]):
        for name, tensor in state.items():
            if not (tied and name == TIED_COPY and layout.pp_size > 1):
                shards.setdefault(name, []).append(tensor)
                tp_dims[name] = meta.get(name, {}).get("tp_dim")
    full = {name: _merge_tp(ts, tp_dims[name]) for name, ts in shards.items()}
    model = build_model(trainer.cfg, trainer.vocab_size, trainer.separator_ids, trainer.tokenizer.eod_id)
    model.load_state_dict(full)
    return model.to(trainer.device)


class TaskEvaluator:
    """Called by the trainer at every eval_interval (every rank); returns the metrics on the logging rank."""

    def __init__(self, trainer, log: Callable[[str], None]):
        tr = trainer.cfg.training
        self.trainer, self.log = trainer, log
        self.settings = EvalSettings(load="", tasks=list(tr.eval_tasks), limit=tr.eval_limit,
                                     task_data=tr.eval_task_data, bootstrap_iters=0, seed=tr.seed, progress=False)
        quiet_lm_eval()

    def __call__(self, iteration: int) -> Dict[str, float]:
        model = gather_whole_model(self.trainer)
        if model is None:
            return {}
        was_training = model.training
        model.eval()
        try:
            lm, _ = lm_for_model(model, self.trainer.cfg, self.trainer.tokenizer, self.settings,
                                 f"training iteration {iteration}", self.log, distributed=False)
            with torch.no_grad():
                results = evaluate(self.settings, self.log, lm=lm)
        finally:
            model.train(was_training)
        return {key.replace("/", "_"): value for key, value in scalar_metrics(results).items()}

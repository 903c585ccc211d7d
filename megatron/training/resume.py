"""Start or resume training state from ``load:``, in one place for every engine.

Weights are loaded before the engine is built (ZeRO copies them into its partitions); the optimizer
state (named, so any data-parallel layout or engine reads it) and the RNG states after. A ``load:``
directory that is missing or holds nothing yet starts from scratch with one line (NeoX's ``save ==
load`` auto-resume habit), except with ``finetune: true``, which needs weights.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron.checkpointing import load_checkpoint, load_optimizer_state, restore_rng_state
from megatron.config import config_to_tree
from megatron.errors import CheckpointError
from megatron.training.engines import AutocastFactory, Engine, build_engine


def nothing_to_load(load: str) -> bool:
    """``load`` does not exist, or is a directory with nothing but hidden entries (write probes,
    unfinished ``.tmp-`` saves): a run that has not saved yet."""
    path = Path(load)
    return not path.exists() or (path.is_dir() and all(p.name.startswith(".") for p in path.iterdir()))


def build_engine_and_resume(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                            autocast: AutocastFactory = contextlib.nullcontext, log: Callable[[str], None] = print
                            ) -> Tuple[Engine, Optional[Dict[str, Any]]]:
    """The engine for ``model``, resumed from ``cfg.checkpoint.load`` when set (weights only with
    ``finetune``). Returns (engine, the loaded checkpoint's manifest or None)."""
    load, finetune = cfg.checkpoint.load, cfg.checkpoint.finetune
    if load and nothing_to_load(load):
        if finetune:
            what = "does not exist" if not Path(load).exists() else "is empty"
            raise CheckpointError(f"finetune: true needs weights, but checkpoint path '{load}' (key 'load') {what}")
        log(f"load: '{load}' holds no checkpoint yet; starting from scratch")
        load = None
    manifest = load_checkpoint(load, model, config_to_tree(cfg)) if load else None
    engine = build_engine(cfg, model, optimizer, device, autocast)
    if manifest is not None and not finetune:
        state = load_optimizer_state(load, model.layout)
        if state is not None:
            engine.load_optimizer_state(state)
        restore_rng_state(load)
    return engine, manifest

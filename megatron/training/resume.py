"""Start or resume training state from ``load:``, in one place for every engine.

Weights are loaded before the engine is built (ZeRO copies them into its partitions); the optimizer
state (named, so any data-parallel layout or engine reads it) and the RNG states after.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch

from megatron.checkpointing import load_checkpoint, load_optimizer_state, restore_rng_state
from megatron.training.engines import AutocastFactory, Engine, build_engine


def build_engine_and_resume(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                            autocast: AutocastFactory = contextlib.nullcontext
                            ) -> Tuple[Engine, Optional[Dict[str, Any]]]:
    """The engine for ``model``, resumed from ``cfg.checkpoint.load`` when set (weights only with
    ``finetune``). Returns (engine, the loaded checkpoint's manifest or None)."""
    load, finetune = cfg.checkpoint.load, cfg.checkpoint.finetune
    manifest = load_checkpoint(load, model) if load else None
    engine = build_engine(cfg, model, optimizer, device, autocast)
    if manifest is not None and not finetune:
        state = load_optimizer_state(load, model.layout)
        if state is not None:
            engine.load_optimizer_state(state)
        restore_rng_state(load)
    return engine, manifest

"""Checks of the pipeline / ZeRO settings that ``validate_layout`` (heads, layers, world size) does
not cover; they need no process group, so they run before any starts."""
from __future__ import annotations

from megatron.config import ConfigError


def zero_stage(cfg) -> int:
    return int((cfg.parallel.zero_optimization or {}).get("stage", 0) or 0)


def check_parallel_config(cfg) -> None:
    par, m, tr = cfg.parallel, cfg.model, cfg.training
    pp, v, accum = par.pipe_parallel_size, par.virtual_pipe_stages, tr.gradient_accumulation_steps
    if v < 1:
        raise ConfigError(f"virtual_pipe_stages {v} must be >= 1")
    if v > 1 and pp == 1:
        raise ConfigError(f"virtual_pipe_stages {v} needs pipe_parallel_size > 1")
    if par.pipe_schedule == "interleaved_1f1b" and pp > 1 and v == 1:
        raise ConfigError("pipe_schedule 'interleaved_1f1b' needs virtual_pipe_stages > 1")
    if v > 1 and par.pipe_schedule == "gpipe":
        raise ConfigError("pipe_schedule 'gpipe' does not support virtual_pipe_stages > 1; "
                          "use 'interleaved_1f1b'")
    if m.num_layers % (pp * v):
        raise ConfigError(f"num_layers {m.num_layers} is not divisible by pipe_parallel_size {pp} x "
                          f"virtual_pipe_stages {v}")
    if pp > 1 and v == 1 and par.pipe_schedule != "gpipe" and accum < pp:
        raise ConfigError(f"gradient_accumulation_steps {accum} (the pipeline's micro-batches) must be >= "
                          f"pipe_parallel_size {pp} for the 1F1B schedule")
    if v > 1 and accum % max(1, accum // pp):
        raise ConfigError(f"interleaved 1F1B needs gradient_accumulation_steps {accum} to be a multiple of "
                          f"{max(1, accum // pp)} (its rounds of pipe_parallel_size micro-batches)")
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage {stage} is not supported; use 0, 1 or 2")
    if stage > 0 and pp > 1:
        raise ConfigError(f"zero_optimization.stage {stage} with pipe_parallel_size {pp} is not supported; "
                          "use stage 0 (flat data-parallel all-reduce) with pipelining")

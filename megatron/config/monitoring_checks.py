"""Checks of the logging, profiling and evaluation-during-training keys (called by ``validation.validate``)."""
from __future__ import annotations

from typing import Callable

from megatron.config.schema import Config

Err = Callable[[str, str], None]


def check_monitoring(cfg: Config, err: Err) -> None:
    lg = cfg.logging
    if lg.profile:
        if not 0 <= lg.profile_step_start < lg.profile_step_stop:
            err("profile_step_stop", f"profile_step_start {lg.profile_step_start} and profile_step_stop "
                                     f"{lg.profile_step_stop}: expected 0 <= start < stop")
        if not (lg.tensorboard_dir or lg.log_dir):
            err("profile", "profile: true writes its traces to tensorboard_dir (as NeoX) or else log_dir; "
                           "set one of them")
    if lg.memory_profiling and not lg.memory_profiling_path:
        err("memory_profiling", "memory_profiling: true needs memory_profiling_path (the directory for the "
                                "snapshot)")
    if cfg.parallel.zero_optimization.stage > 0 and lg.log_gradient_noise_scale:
        err("log_gradient_noise_scale", "log_gradient_noise_scale keeps whole gradients of several steps, which ZeRO "
                                        f"(zero_optimization.stage {cfg.parallel.zero_optimization.stage}) partitions "
                                        "over ranks; NeoX refuses it under ZeRO too")
    if lg.gradient_noise_scale_n_batches < 2:
        err("gradient_noise_scale_n_batches", f"gradient_noise_scale_n_batches = "
                                              f"{lg.gradient_noise_scale_n_batches}; expected an integer >= 2")
    ck = cfg.checkpoint
    if ck.checkpoint_scale == "log" and ck.checkpoint_factor < 2:
        err("checkpoint_scale", f"checkpoint_scale log saves at powers of checkpoint_factor, which is "
                                f"{ck.checkpoint_factor}; expected checkpoint_factor >= 2")
    if ck.iteration is not None and (ck.iteration < 0 or not ck.load):
        err("iteration", f"iteration {ck.iteration} names the step to load: it needs load: and must be >= 0")
    tr = cfg.training
    if tr.eval_tasks is not None and not tr.eval_tasks:
        err("eval_tasks", "eval_tasks is an empty list; name tasks (e.g. [docs_lambada, docs_cloze]) or remove it")
    if tr.eval_tasks and not tr.eval_interval:
        err("eval_tasks", "eval_tasks run at every eval_interval, which is 0; set eval_interval")
    if tr.eval_limit is not None and tr.eval_limit <= 0:
        err("eval_limit", f"eval_limit = {tr.eval_limit}; expected a positive number of examples (or a fraction)")

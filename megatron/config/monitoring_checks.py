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

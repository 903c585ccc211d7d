"""Training metrics to stdout, a JSONL file, wandb (offline by default) and tensorboard.

``metrics.jsonl`` is strict JSON, one object per line: a non-finite value (the loss of a skipped
step) is written as ``null``; wandb and tensorboard get the float itself.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

from megatron.config.schema import Config


def json_number(value):
    """NaN and infinities are not JSON: metrics.jsonl holds ``null`` for them (a skipped step's loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, cfg: Config, is_writer: bool, config_tree: Optional[dict] = None):
        self.is_writer = is_writer
        self.jsonl = None
        self.wandb = None
        self.tb = None
        if not is_writer:
            return
        lg = cfg.logging
        if lg.log_dir:
            Path(lg.log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(lg.log_dir) / "metrics.jsonl", "a", buffering=1)
        if lg.use_wandb:
            os.environ.setdefault("WANDB_MODE", lg.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=lg.wandb_project, group=lg.wandb_group, config=config_tree,
                                    dir=lg.log_dir or ".")
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(lg.tensorboard_dir)

    def log(self, iteration: int, metrics: Dict[str, float], prefix: str = "train") -> None:
        if not self.is_writer:
            return
        record = {"iteration": iteration, "time": time.time(),
                  **{f"{prefix}/{k}": json_number(v) for k, v in metrics.items()}}
        if self.jsonl:
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=iteration)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()

"""Training metrics to stdout, a JSONL file, wandb (offline by default) and tensorboard.

``metrics.jsonl`` is strict JSON, one object per line: a non-finite value (the loss of a skipped
step) is written as ``null``; wandb and tensorboard get the float itself.
wandb ``online`` without credentials (no ``WANDB_API_KEY``, no netrc entry for the host) falls back
to ``offline`` with one line, so a run never stops at a login prompt.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional
from urllib.parse import urlparse

from megatron.config.schema import Config


def json_number(value):
    """NaN and infinities are not JSON: metrics.jsonl holds ``null`` for them (a skipped step's loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def wandb_credentials(host: Optional[str]) -> bool:
    """An API key in the environment, or a netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    name = urlparse(host or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(name) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str, host: Optional[str], log: Callable[[str], None]) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested == "online" and not wandb_credentials(host):
        log("wandb: online logging needs WANDB_API_KEY or `wandb login`; logging offline instead "
            "(sync later with `wandb sync`)")
        return "offline"
    return requested


class MetricsLogger:
    def __init__(self, cfg: Config, is_writer: bool, config_tree: Optional[dict] = None,
                 log: Callable[[str], None] = print):
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
            if lg.wandb_host:
                os.environ.setdefault("WANDB_BASE_URL", lg.wandb_host)
            os.environ["WANDB_MODE"] = wandb_mode(lg.wandb_mode, lg.wandb_host, log)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=lg.wandb_project, group=lg.wandb_group, entity=lg.wandb_entity,
                                    name=lg.wandb_run_name, config=config_tree, dir=lg.log_dir or ".")
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

"""Training metrics to stdout, a JSONL file, wandb (offline by default) and tensorboard.

``metrics.jsonl`` is strict JSON, one object per line: a non-finite value (the loss of a skipped
step) is written as ``null``; wandb and tensorboard get the float itself.
wandb ``online`` without credentials (no ``WANDB_API_KEY``, no netrc entry for the host) falls back
to ``offline``, so a run never stops at a login prompt; an offline run says so in one line, with the
directory ``wandb sync`` uploads.

Tensorboard and wandb get GPT-NeoX's tags (``train/lm_loss``, ``validation/lm_loss``,
``runtime/tokens_per_sec``, ... :data:`NEOX_TAGS`), so NeoX dashboards keep working; ``metrics.jsonl``
keeps our names (``train/loss``, ``valid/loss``).
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


def wandb_mode(requested: str, host: Optional[str]) -> str:
    """The mode wandb runs in: ``WANDB_MODE`` wins; ``online`` without credentials is ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested == "online" and not wandb_credentials(host):
        return "offline"
    return requested


def offline_line(requested: str, run_dir: str) -> str:
    """The one line an offline wandb run prints: why, where its files are, how to upload them."""
    why = " (online needs WANDB_API_KEY or `wandb login`)" if requested == "online" else ""
    return f"wandb: logging offline{why}; run files in {run_dir}; upload with `wandb sync {run_dir}`"


# (our group, our metric) -> GPT-NeoX's tensorboard / wandb tag (megatron/logging.py and training.py).
NEOX_TAGS = {
    ("train", "loss"): "train/lm_loss", ("train", "lr"): "train/learning_rate",
    ("train", "loss_scale"): "train/loss_scale", ("train", "noise_scale"): "train/noise_scale",
    ("train", "tokens_per_sec"): "runtime/tokens_per_sec", ("train", "iter_time"): "runtime/iteration_time",
    ("train", "samples_per_sec"): "runtime/samples_per_sec",
    ("train", "flops_per_sec_per_device"): "runtime/flops_per_sec_per_gpu",
    ("train", "mfu"): "runtime/model_flops_utilization",
    ("valid", "loss"): "validation/lm_loss", ("valid", "ppl"): "validation/lm_loss_ppl",
    ("test", "loss"): "test/lm_loss", ("test", "ppl"): "test/lm_loss_ppl",
}
NEOX_GROUPS = {"valid": "validation"}


def neox_tag(prefix: str, key: str) -> str:
    """The tag NeoX writes for our ``prefix/key`` (metrics NeoX has no tag for keep ours, with NeoX's
    group name; keys holding a '/' are already full tags, e.g. ``parameter_norms/NAME``)."""
    if "/" in key:
        return key
    return NEOX_TAGS.get((prefix, key), f"{NEOX_GROUPS.get(prefix, prefix)}/{key}")


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
            mode = os.environ["WANDB_MODE"] = wandb_mode(lg.wandb_mode, lg.wandb_host)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=lg.wandb_project, group=lg.wandb_group, entity=lg.wandb_entity,
                                    name=lg.wandb_run_name, config=config_tree, dir=lg.log_dir or ".")
            if mode == "offline":
                log(offline_line(lg.wandb_mode, str(Path(self.wandb.dir).parent)))
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
            self.wandb.log({neox_tag(prefix, k): v for k, v in metrics.items()}, step=iteration)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(neox_tag(prefix, k), v, iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()

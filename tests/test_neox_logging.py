"""What NeoX users see of a run's logging: NeoX's tensorboard tags, and wandb without an API key saying in one
line that it logs offline and where."""
import math
import os

import pytest
from conftest import tiny_config_tree
from test_neox_train import run

from megatron.config import config_from_tree
from megatron.training.metrics import MetricsLogger


def tensorboard_scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_tags_are_neox_tags(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    run(tiny_config_tree(tiny_dataset, train_iters=2, eval_interval=2, log_interval=1, split="80,10,10",
                         tensorboard_dir=str(tmp_path / "tb"), log_dir=str(tmp_path / "log")))
    tags = tensorboard_scalars(tmp_path / "tb")
    for tag in ("train/lm_loss", "train/learning_rate", "runtime/tokens_per_sec", "runtime/iteration_time",
                "runtime/flops_per_sec_per_gpu", "validation/lm_loss", "validation/lm_loss_ppl", "test/lm_loss"):
        assert tag in tags, sorted(tags)
    assert "train/loss" not in tags and "valid/loss" not in tags
    (step, val), = tags["validation/lm_loss"]
    (_, ppl), = tags["validation/lm_loss_ppl"]
    assert step == 2 and ppl == pytest.approx(math.exp(val), rel=1e-5)


def test_use_wandb_without_a_key_says_offline_and_where(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config_from_tree({"use_wandb": True, "wandb_mode": "online", "log_dir": str(tmp_path / "log")})
    said = []
    logger = MetricsLogger(cfg, True, {}, log=said.append)
    try:
        logger.log(1, {"loss": 2.0})
    finally:
        logger.close()
    assert len(said) == 1, said
    line = said[0]
    assert line.startswith("wandb: logging offline (online needs WANDB_API_KEY or `wandb login`); run files in ")
    run_dir = line.split("run files in ")[1].split(";")[0]
    assert os.path.isdir(run_dir) and os.path.basename(run_dir).startswith("offline-run-")
    assert line.endswith(f"upload with `wandb sync {run_dir}`")

"""NeoX's checkpoint keys: iteration (the step to load), checkpoint_scale, checkpoint_validation_with_forward_pass,
and s3_path refused in one line."""
import re

import pytest
import torch
from conftest import tiny_config_tree
from test_neox_train import run

from megatron.config import config_from_tree
from megatron.errors import CheckpointError, ConfigError
from megatron.training.checkpoint_checks import on_save_schedule


def test_checkpoint_scale_log_saves_at_powers_of_the_factor(tiny_dataset, tmp_path):
    cfg = config_from_tree({"checkpoint_factor": 2, "checkpoint_scale": "log"}, log=lambda m: None)
    assert [i for i in range(1, 40) if on_save_schedule(cfg.checkpoint, i)] == [1, 2, 4, 8, 16, 32]
    cfg.checkpoint.checkpoint_scale = "linear"
    assert [i for i in range(1, 9) if on_save_schedule(cfg.checkpoint, i)] == [2, 4, 6, 8]
    run(tiny_config_tree(tiny_dataset, train_iters=5, save=str(tmp_path / "s"), checkpoint_factor=2,
                         checkpoint_scale="log"))
    assert sorted(p.name for p in (tmp_path / "s").glob("global_step*")) == \
        ["global_step1", "global_step2", "global_step4", "global_step5"]  # 5: the end of training
    with pytest.raises(ConfigError, match="checkpoint_scale log saves at powers of checkpoint_factor"):
        config_from_tree({"checkpoint_factor": 1, "checkpoint_scale": "log"}, log=lambda m: None)


def test_iteration_loads_that_step_and_validation_with_a_forward_pass(tiny_dataset, tmp_path, monkeypatch):
    save = str(tmp_path / "s")
    base = dict(train_iters=4, checkpoint_factor=2, save=save, checkpoint_validation_with_forward_pass=True)
    run(tiny_config_tree(tiny_dataset, **base))
    logs = []
    trainer, _ = run(tiny_config_tree(tiny_dataset, **{**base, "train_iters": 3, "save": str(tmp_path / "t")},
                                      load=save, iteration=2), logs)
    assert any(f"resumed from {save}/global_step2 at iteration 2" in ln for ln in logs), logs
    assert any(re.match(r"checkpoint validated with a forward pass: the fixed batch's loss [\d.]+ equals the saved",
                        ln) for ln in logs), logs
    assert trainer.iteration == 3
    with pytest.raises(CheckpointError, match=r"iteration 3: no checkpoint .*global_step3.*available iterations: "
                                              r"2, 4$"):
        run(tiny_config_tree(tiny_dataset, **{**base, "save": None}, load=save, iteration=3))
    # a model that computes something else after loading than it did when saved: the load is refused
    from megatron.training import checkpoint_checks

    real = checkpoint_checks.fixed_batch_loss
    monkeypatch.setattr(checkpoint_checks, "fixed_batch_loss", lambda trainer: real(trainer) + 1e-3)
    with pytest.raises(CheckpointError, match="fails checkpoint_validation_with_forward_pass: the fixed batch's loss"):
        run(tiny_config_tree(tiny_dataset, **{**base, "save": None}, load=save, iteration=2))


def test_s3_path_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"key 's3_path' = 's3://bucket/run' is not supported: uploading "
                                          r"checkpoints to S3 is not implemented"):
        config_from_tree({"s3_path": "s3://bucket/run"}, log=lambda m: None)
    config_from_tree({"s3_path": None, "s3_chunk_size": 1 << 20}, log=lambda m: None)


def test_eval_settings_take_the_step_named_by_iteration(tmp_path):
    from eval_helpers import save_tiny_checkpoint

    from megatron.checkpointing import save_checkpoint
    from megatron.evaluation.runner import settings_from_config

    root = save_tiny_checkpoint(tmp_path / "save")  # global_step1
    save_checkpoint(str(root), 3, torch.nn.Linear(1, 1), None, {}, {})
    cfg = tmp_path / "eval.yml"
    cfg.write_text(f"load: {root}\niteration: 1\n")
    assert settings_from_config([str(cfg)], tasks=["docs"]).load == str(root / "global_step1")
    assert settings_from_config([str(cfg)], load=str(root), tasks=["docs"]).load == str(root)
    cfg.write_text(f"load: {root}\niteration: 2\n")
    with pytest.raises(CheckpointError, match="available iterations: 1, 3"):
        settings_from_config([str(cfg)], tasks=["docs"])

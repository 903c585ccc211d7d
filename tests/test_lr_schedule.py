import math

import pytest

from megatron.training.lr_schedule import LRSchedule


def test_warmup_then_cosine_to_min():
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert s.lr_at(1) == pytest.approx(0.1)
    assert s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert lin.lr_at(25) == pytest.approx(0.75)
    const = LRSchedule(1.0, 0.0, 4, 100, "constant")
    assert const.lr_at(2) == pytest.approx(0.5) and const.lr_at(90) == 1.0


def test_from_config_uses_neox_warmup_fraction():
    from megatron.config import config_from_tree

    cfg = config_from_tree({"train_iters": 200, "warmup": 0.1, "min_lr": 1e-5,
                            "optimizer": {"params": {"lr": 1e-3}}})
    s = LRSchedule.from_config(cfg)
    assert (s.warmup_iters, s.decay_iters, s.max_lr, s.min_lr) == (20, 200, 1e-3, 1e-5)

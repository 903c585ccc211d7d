"""fp16 with dynamic loss scaling (NeoX's ``fp16`` section): the scaler's rule against DeepSpeed's,
overflow steps skipped and counted, fp16 losses equal to fp32 within fp16 precision, exact resume; under
ZeRO, DeepSpeed's scaler where DeepSpeed runs fp16 and one refusal line where it does not."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import ROOT, TOKENIZER, run_cli, tiny_config_tree
from distributed_helpers import model_tree, run_layout, train_layout

from megatron.config import config_from_tree, load_config, validate_device
from megatron.config.validation import deepspeed_fp16_device
from megatron.errors import ConfigError
from megatron.training.loss_scaler import LossScaler
from megatron.training.trainer import Trainer


# ------------------------------------------------------------------ the scaling rule
def deepspeed_scales(overflows, **kw):
    """The loss scale after every step by DeepSpeed's own DynamicLossScaler (never raising at the minimum)."""
    from deepspeed.runtime.fp16 import loss_scaler as ds

    real_get_rank = ds.dist.get_rank
    ds.dist.get_rank = lambda: 1  # it only logs on rank 0, and needs no process group otherwise
    try:  # deepspeed.comm is shared by the whole process: later ZeRO tests need the real get_rank back
        scaler = ds.DynamicLossScaler(init_scale=2.0 ** kw["initial_scale_power"],
                                      scale_window=kw["loss_scale_window"], min_scale=kw["min_loss_scale"],
                                      delayed_shift=kw["hysteresis"], consecutive_hysteresis=False,
                                      raise_error_at_min_scale=False)
        scales = []
        for overflow in overflows:
            scaler.update_scale(overflow)
            scales.append(scaler.cur_scale)
    finally:
        ds.dist.get_rank = real_get_rank
    return scales


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hysteresis,window", [(1, 3), (2, 4), (3, 1)])
def test_dynamic_scale_follows_deepspeed(seed: int, hysteresis: int, window: int):
    rng = random.Random(seed)
    overflows = [rng.random() < 0.3 for _ in range(200)]
    kw = dict(initial_scale_power=6, loss_scale_window=window, hysteresis=hysteresis, min_loss_scale=2.0)
    ours = LossScaler(0, **kw)
    got = [ours.update(o)["loss_scale"] for o in overflows]
    assert got == deepspeed_scales(overflows, **kw)
    assert ours.skipped_steps == sum(overflows)


def test_scale_halves_on_overflow_and_doubles_after_a_window_of_good_steps():
    s = LossScaler(0, initial_scale_power=10, loss_scale_window=3, hysteresis=1, min_loss_scale=256)
    stats = s.update(True)
    assert stats == {"loss_scale": 512.0, "skipped_steps": 1.0, "fp16_overflow": 1.0}
    # three good steps complete the window; the next good step doubles the scale
    assert [s.update(False)["loss_scale"] for _ in range(4)] == [512.0, 512.0, 512.0, 1024.0]
    assert [s.update(True)["loss_scale"] for _ in range(3)] == [512.0, 256.0, 256.0]
    assert s.update(True)["fp16_overflow"] == 0.0  # at the minimum nothing adapts: a real failure
    assert s.skipped_steps == 5


def test_hysteresis_tolerates_overflows_before_halving():
    s = LossScaler(0, initial_scale_power=4, loss_scale_window=100, hysteresis=3)
    assert [s.update(True)["loss_scale"] for _ in range(4)] == [16.0, 16.0, 8.0, 4.0]


def test_static_scale_never_changes():
    s = LossScaler(loss_scale=128.0)
    assert [s.update(o)["loss_scale"] for o in (True, False, True)] == [128.0] * 3
    assert s.skipped_steps == 2 and s.update(True)["fp16_overflow"] == 0.0


# ------------------------------------------------------------------ config
def test_precision_and_fp16_section_mean_the_same_and_conflicts_are_errors():
    assert config_from_tree({"fp16": {"enabled": True}}).training.precision == "fp16"
    cfg = config_from_tree({"precision": "fp16", "fp16": {"loss_scale_window": 50}})
    assert cfg.training.fp16.enabled and cfg.training.fp16.loss_scale_window == 50
    # NeoX's rule (megatron/config/compat_groups.py): a later file wins, one file saying both is an error
    later = config_from_tree({"precision": "bf16", "fp16": {"enabled": True}}, {"precision": "a.yml", "fp16": "b.yml"},
                             log=lambda *_: None)
    assert later.training.precision == "fp16" and later.training.fp16.enabled
    with pytest.raises(ConfigError, match="precision conflict"):
        config_from_tree({"precision": "bf16", "fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="fp16 needs loss_scale >= 0"):
        config_from_tree({"precision": "fp16", "fp16": {"hysteresis": 0}})
    with pytest.raises(ConfigError, match="unknown key 'fp16.loss_scal'"):
        config_from_tree({"fp16": {"loss_scal": 0}})


def test_zero_engine_gets_the_fp16_section():
    from megatron.training.zero import deepspeed_config

    ds = deepspeed_config(config_from_tree({"precision": "fp16", "fp16": {"initial_scale_power": 12}}))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1.0}
    assert deepspeed_config(config_from_tree({}))["fp16"]["enabled"] is False


# ------------------------------------------------------------------ the engine
FP16 = dict(precision="fp16", fp16={"initial_scale_power": 12, "hysteresis": 1, "loss_scale_window": 1000},
            gradient_accumulation_steps=1, attention={"impl": "compact"})


def test_fp16_losses_equal_fp32_within_fp16_precision():
    """CPU fp16 autocast (fp32 weights): the same run as fp32 to ~1e-3, with no overflow at scale 2^12."""
    ref = train_layout(model_tree(**{k: v for k, v in FP16.items() if k not in ("precision", "fp16")}), steps=10)
    half = train_layout(model_tree(**FP16), steps=10)
    assert max(abs(a - b) for a, b in zip(half["losses"], ref["losses"])) < 2e-3, (half["losses"], ref["losses"])
    assert half["losses"] != ref["losses"]  # fp16 compute really happened
    assert all(s["loss_scale"] == 4096.0 and s["fp16_overflow"] == 0.0 for s in half["stats"])


def test_injected_overflow_is_skipped_counted_and_halves_the_scale():
    clean = train_layout(model_tree(**FP16), steps=4)
    hit = train_layout(model_tree(**FP16), steps=4, overflow_at={0: 1})
    stats = hit["stats"]
    assert [s["loss_scale"] for s in stats] == [4096.0, 2048.0, 2048.0, 2048.0]
    assert [s["skipped_steps"] for s in stats] == [0.0, 1.0, 1.0, 1.0]
    assert [s["fp16_overflow"] for s in stats] == [0.0, 1.0, 0.0, 0.0]
    assert stats[1]["grad_norm"] == float("inf")
    assert hit["losses"][:2] == clean["losses"][:2]  # the loss is computed; only the update is skipped


def test_overflow_step_leaves_weights_and_adam_state_untouched():
    from megatron.model import build_model
    from megatron.training.engines import build_engine
    from megatron.training.optimizer import build_optimizer

    cfg = config_from_tree(model_tree(**FP16))
    model = build_model(cfg, 96, [3, 7, 11])
    engine = build_engine(cfg, model, build_optimizer(model, cfg), torch.device("cpu"),
                          lambda: torch.autocast("cpu", dtype=torch.float16))
    batch = [torch.randint(0, 96, (2, 33))]
    engine.train_step(batch, 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adam = engine.optimizer_state()
    hook = model.embed.weight.register_hook(lambda g: g * float("nan"))
    stats = engine.train_step(batch, 1e-3)
    hook.remove()
    assert stats["fp16_overflow"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after = engine.optimizer_state()
    assert after["loss_scaler"]["skipped_steps"] == 1
    for name, st in adam["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][name][k])) for k, v in st.items())


def test_fp16_trainer_logs_the_scale_and_resumes_it_exactly(tiny_dataset, tmp_path):
    """Scale 2^24 overflows at first on this model: the scale falls step by step. A run resumed at step 3
    continues with the saved scale (not 2^24 again), so it is bit-exact with the uninterrupted run."""
    kw = dict(train_iters=6, precision="fp16", fp16={"initial_scale_power": 24, "hysteresis": 1})
    lines = []
    full = Trainer(config_from_tree(tiny_config_tree(tiny_dataset, **kw)), log=lines.append).train()
    scales = [float(ln.split("loss scale ")[1].split(" ")[0]) for ln in lines if "loss scale" in ln]
    assert len(scales) == 6 and scales[0] < 2 ** 24 and "skipped" in lines[-1]
    save = str(tmp_path / "ckpt")
    Trainer(config_from_tree(tiny_config_tree(tiny_dataset, save=save, exit_interval=3, **kw)), log=print).train()
    resumed_lines = []
    resumed = Trainer(config_from_tree(tiny_config_tree(tiny_dataset, save=save, load=save, **kw)),
                      log=resumed_lines.append).train()
    assert resumed == full[3:]
    assert [float(ln.split("loss scale ")[1].split(" ")[0]) for ln in resumed_lines if "loss scale" in ln] == scales[3:]


# ------------------------------------------------------------------ every rank agrees
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(model_parallel_size=2), dict(pipe_parallel_size=2, pipe_schedule="gpipe")])
def test_overflow_on_one_rank_skips_the_step_on_all(layout):
    """Rank 1 alone overflows (TP: its vocabulary shard; PP: the last stage's head), every rank skips."""
    results = run_layout(model_tree(**layout, **FP16), 2, steps=3, overflow_at={1: 1})
    for r in results:
        assert [s["fp16_overflow"] for s in r["stats"]] == [0.0, 1.0, 0.0]
        assert [s["loss_scale"] for s in r["stats"]] == [4096.0, 2048.0, 2048.0]
    single = train_layout(model_tree(**FP16), steps=3, overflow_at={0: 1})
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], single["losses"])) < 1e-3


# ------------------------------------------------------------------ ZeRO: DeepSpeed's fp16, where DeepSpeed has it
def skip_unless_deepspeed_has_fp16():
    device, has_fp16 = deepspeed_fp16_device()
    if not has_fp16:
        pytest.skip(f"DeepSpeed has no fp16 on this machine's {device} (it needs CUDA, or a CPU with "
                    "AVX512-FP16/AMX-FP16); the refusal is checked here instead")


def test_zero_fp16_is_refused_in_one_line_where_deepspeed_has_no_fp16(tiny_dataset, tmp_path):
    """NeoX's 160M recipe (fp16 + ZeRO-1) where DeepSpeed refuses fp16: the ranks refuse it in one line and
    exit 2 (not DeepSpeed's traceback in every rank); a dry run, which may be on a login node without the
    GPUs, warns in one line and goes on; without ZeRO the same config is accepted."""
    device, has_fp16 = deepspeed_fp16_device()
    if has_fp16:
        pytest.skip(f"DeepSpeed runs fp16 on this machine's {device}: the ZeRO fp16 tests below run instead")
    message = (f"precision fp16 with zero_optimization.stage 1: DeepSpeed has no fp16 on this machine's {device} "
               "(it needs CUDA, or a CPU with AVX512-FP16/AMX-FP16); use precision bf16 or fp32, or "
               "zero_optimization.stage 0 (fp16 with our own loss scaler)")
    dialect = ROOT / "tests" / "data" / "neox_dialect"
    recipe = str(dialect / "my_neox_160M.yml")
    overlay = tmp_path / "local.yml"  # NeoX's test overlay, keeping the recipe's fp16
    text = (dialect / "tiny_overlay.yml").read_text().replace('"precision": "fp32"', "")
    overlay.write_text(text + f'"data-path": "{tiny_dataset}"\n"vocab-file": "{TOKENIZER}"\n')
    dry = run_cli(["deepy.py", "--dry-run", "train.py", recipe, str(overlay)])
    assert dry.returncode == 0, dry.stderr
    assert f"warning: ranks on a machine like this one will refuse this config: {message}" in dry.stdout.splitlines()
    out = run_cli(["deepy.py", "--num-procs", "2", "train.py", recipe, str(overlay)])
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"error: {message}"], out.stderr
    cfg, _ = load_config([recipe], log=lambda m: None)
    cfg.parallel.zero_optimization.stage = 0
    validate_device(cfg, "cpu")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_fp16_reports_deepspeed_scale_and_skips():
    skip_unless_deepspeed_has_fp16()
    tree = model_tree(zero_optimization={"stage": 1}, gradient_accumulation_steps=2,
                      **{k: v for k, v in FP16.items() if k != "gradient_accumulation_steps"})
    results = run_layout(tree, 2, steps=3, overflow_at={0: 1, 1: 1})
    stats = results[0]["stats"]
    assert [s["loss_scale"] for s in stats] == [4096.0, 2048.0, 2048.0]
    assert [s["skipped_steps"] for s in stats] == [0.0, 1.0, 1.0]
    assert [s["fp16_overflow"] for s in stats] == [0.0, 1.0, 0.0]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_fp16_resume_continues_with_the_saved_scale(tmp_path):
    """Scale 2^24 overflows at first; the checkpoint at step 2 carries DeepSpeed's scaler state."""
    skip_unless_deepspeed_has_fp16()
    tree = model_tree(zero_optimization={"stage": 2}, gradient_accumulation_steps=2, precision="fp16",
                      fp16={"initial_scale_power": 24, "hysteresis": 1}, attention={"impl": "compact"})
    full = run_layout(tree, 2, steps=4, save_at=2, save_dir=str(tmp_path))[0]
    resumed = run_layout(tree, 2, steps=4, load=str(tmp_path))[0]
    assert full["stats"][0]["loss_scale"] < 2 ** 24
    assert [s["loss_scale"] for s in resumed["stats"]] == [s["loss_scale"] for s in full["stats"][2:]]
    assert [s["skipped_steps"] for s in resumed["stats"]] == [s["skipped_steps"] for s in full["stats"][2:]]
    assert max(abs(a - b) for a, b in zip(resumed["losses"], full["losses"][2:])) < 1e-5

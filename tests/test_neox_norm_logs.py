"""NeoX's optional logs (log_param_norm, log_grad_norm, log_grad_pct_zeros, log_optimizer_states,
log_gradient_noise_scale) are figures of whole parameters: checked against the model itself on one process,
and a TP2 x ZeRO-free run through deepy.py against one process."""
import json
import math

import pytest
from conftest import free_port, run_cli, tiny_config_tree, write_config
from test_neox_train import run

GROUPS = ("parameter_norms", "gradient_norms", "pct_grad_zeros", "optimizer_state_norms", "param_norm",
          "noise_scale")
NEOX_LOGS = dict(log_param_norm=True, log_grad_norm=True, log_grad_pct_zeros=True, log_optimizer_states=True,
                 log_gradient_noise_scale=True, gradient_noise_scale_n_batches=2)


def last_record(log_dir) -> dict:
    records = [json.loads(ln) for ln in open(log_dir / "metrics.jsonl")]
    return [r for r in records if "train/loss" in r][-1]


def logged(record: dict) -> list:
    return [k for k in record if k.count("/") and k.split("/")[1] in GROUPS]


def figures(record: dict, group: str) -> dict:
    return {k[len(f"train/{group}/"):]: v for k, v in record.items() if k.startswith(f"train/{group}/")}


def test_logged_norms_are_the_models_own(tiny_dataset, tmp_path):
    logs = []
    trainer, _ = run(tiny_config_tree(tiny_dataset, train_iters=4, log_interval=2, log_dir=str(tmp_path / "log"),
                                      **NEOX_LOGS), logs)
    rec = last_record(tmp_path / "log")
    params = dict(trainer.model.named_parameters())
    norms = figures(rec, "parameter_norms")
    assert set(norms) == set(params)
    for name, p in params.items():
        assert norms[name] == pytest.approx(float(p.detach().double().norm()), rel=1e-6), name
    assert rec["train/param_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms.values())), rel=1e-6)
    # per-parameter gradient norms (before clipping) make up the logged total
    grads = figures(rec, "gradient_norms")
    assert set(grads) == set(params)
    assert math.sqrt(sum(v * v for v in grads.values())) == pytest.approx(rec["train/grad_norm"], rel=1e-5)
    zeros = figures(rec, "pct_grad_zeros")
    assert set(zeros) == set(params) and all(0.0 <= v <= 100.0 for v in zeros.values())
    state = trainer.engine.optimizer_state()["state"]
    opt = figures(rec, "optimizer_state_norms")
    for name, entry in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt[f"{name}_{key}"] == pytest.approx(float(entry[key].double().norm()), rel=1e-6)
    assert math.isfinite(rec["train/noise_scale"])
    line = [ln for ln in logs if ln.startswith("iter      4/4")][0]
    assert f"| param_norm {rec['train/param_norm']:.3f}" in line and "| noise_scale " in line


@pytest.mark.slow
def test_tp2_logs_equal_one_process(tiny_dataset, tmp_path):
    """Shards are summed over the tensor-parallel group, replicated tensors counted once."""
    records = {}
    for name, procs, extra in (("one", 1, {}), ("tp2", 2, {"model_parallel_size": 2})):
        tree = tiny_config_tree(tiny_dataset, train_iters=4, log_interval=2, log_dir=str(tmp_path / name),
                                attention={"impl": "compact"}, **NEOX_LOGS, **extra)
        out = run_cli(["deepy.py", "--num-procs", str(procs), "--master-port", str(free_port()), "train.py",
                       write_config(tmp_path / f"{name}.yml", tree)])
        assert out.returncode == 0, out.stderr[-3000:]
        records[name] = last_record(tmp_path / name)
    one, tp2 = records["one"], records["tp2"]
    keys = logged(one)
    assert len(keys) > 40 and set(keys) <= set(tp2)
    for k in keys:
        if k.startswith("train/pct_grad_zeros/") and k.endswith("qkv.bias"):
            continue  # the key bias's gradient is zero in exact arithmetic: which entries round to 0.0 varies
        assert tp2[k] == pytest.approx(one[k], rel=2e-4, abs=1e-6), k


def test_zero_refuses_only_the_noise_scale(tiny_dataset):
    from megatron.config import config_from_tree
    from megatron.errors import ConfigError

    tree = tiny_config_tree(tiny_dataset, zero_optimization={"stage": 1}, **NEOX_LOGS)
    with pytest.raises(ConfigError, match="log_gradient_noise_scale keeps whole gradients of several steps"):
        config_from_tree(tree, log=lambda m: None)
    tree.update(log_gradient_noise_scale=False)
    assert config_from_tree(tree, log=lambda m: None).logging.log_grad_norm  # the rest is accepted


def test_zero1_gradient_logs_equal_the_dense_run(tiny_dataset, tmp_path):
    """Under ZeRO the gradients are assembled from DeepSpeed's partitions before the step."""
    keys = dict(log_param_norm=True, log_grad_norm=True, log_grad_pct_zeros=True, log_optimizer_states=True)
    recs = []
    for name, stage in (("dense", 0), ("zero1", 1)):
        run(tiny_config_tree(tiny_dataset, train_iters=2, log_interval=2, log_dir=str(tmp_path / name),
                             zero_optimization={"stage": stage}, **keys))
        recs.append(last_record(tmp_path / name))
    dense, zero = recs
    keys = logged(dense)
    assert len(keys) > 40 and set(keys) <= set(zero)
    for k in keys:
        assert zero[k] == pytest.approx(dense[k], rel=1e-5, abs=1e-7), k


def test_log_param_norm_is_a_key_and_its_misspelling_points_to_it():
    from megatron.config import config_from_tree
    from megatron.errors import ConfigError

    assert config_from_tree({"log_param_norm": True}, log=lambda m: None).logging.log_param_norm
    with pytest.raises(ConfigError, match=r"unknown key 'log_param_nrom'; did you mean 'log_param_norm'\?"):
        config_from_tree({"log_param_nrom": True}, log=lambda m: None)

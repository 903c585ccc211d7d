"""ZeRO stage 1/2 through DeepSpeed (gloo, CPU): same losses and final weights as the 1-rank run, and a
ZeRO checkpoint (consolidated AdamW state) resumes exactly in a plain DP run and vice versa."""
import pytest
import torch
from distributed_helpers import merge_grads, model_tree, run_layout, train_layout

pytestmark = [pytest.mark.distributed]
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return train_layout(model_tree(), steps=5)


def close(a, b):
    return max(abs(x - y) for x, y in zip(a, b)) < TOL


def assert_same_weights(reference, results):
    """After the run every parameter equals the one-rank run's: ZeRO's partitioned gradients, clipping
    and AdamW step were the same (a stronger check than the losses)."""
    weights = merge_grads(results, key="weights")
    assert set(weights) == set(reference["weights"])
    for name, w in reference["weights"].items():
        assert torch.allclose(weights[name], w, atol=TOL, rtol=0), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_dp2_matches_single_rank(reference, stage):
    tree = model_tree(gradient_accumulation_steps=2, zero_optimization={"stage": stage})
    results = run_layout(tree, 2)
    assert close(results[0]["losses"], reference["losses"]), (results[0]["losses"], reference["losses"])
    assert_same_weights(reference, results)


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("zero2")
    tree = model_tree(gradient_accumulation_steps=2, zero_optimization={"stage": 2})
    return str(save), run_layout(tree, 2, save_at=3, save_dir=str(save))[0]["losses"]


@pytest.mark.slow
def test_zero2_checkpoint_resumes_without_zero(zero_checkpoint):
    save, losses = zero_checkpoint
    plain = run_layout(model_tree(gradient_accumulation_steps=2), 2, load=save)
    assert close(plain[0]["losses"], losses[3:])


@pytest.mark.slow
def test_zero2_checkpoint_resumes_with_zero(zero_checkpoint):
    save, losses = zero_checkpoint
    tree = model_tree(gradient_accumulation_steps=2, zero_optimization={"stage": 2})
    assert close(run_layout(tree, 2, load=save)[0]["losses"], losses[3:])


@pytest.mark.slow
def test_tp2_zero1_dp2_matches_single_rank(reference):
    tree = model_tree(model_parallel_size=2, gradient_accumulation_steps=2, zero_optimization={"stage": 1})
    results = run_layout(tree, 4)
    assert close(results[0]["losses"], reference["losses"])
    assert_same_weights(reference, results)


def test_tp2_sequence_parallel_zero2_dp2_matches_single_rank(reference):
    """The default tier's ZeRO run: TP2 with sequence parallelism x ZeRO-2 over DP2."""
    tree = model_tree(model_parallel_size=2, sequence_parallel=True, gradient_accumulation_steps=2,
                      zero_optimization={"stage": 2})
    results = run_layout(tree, 4)
    assert close(results[0]["losses"], reference["losses"])
    assert_same_weights(reference, results)


@pytest.mark.slow
def test_zero2_trainer_through_deepy_matches_single_process(tiny_dataset, tmp_path):
    import json

    from conftest import free_port, run_cli, tiny_config_tree, write_config

    kw = dict(train_iters=4, eval_interval=2, eval_iters=1)
    one = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "one"), train_micro_batch_size_per_gpu=2, **kw)
    zero = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "z"), train_micro_batch_size_per_gpu=1,
                            zero_optimization={"stage": 2}, save=str(tmp_path / "ck"), **kw)
    assert run_cli(["train.py", write_config(tmp_path / "one.yml", one)]).returncode == 0
    out = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "train.py",
                   write_config(tmp_path / "z.yml", zero)])
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = [[(k, v) for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) for k, v in r.items()
                if k.endswith("/loss")] for d in ("one", "z")]
    assert [k for k, _ in metrics[0]] == [k for k, _ in metrics[1]] and len(metrics[0]) == 6
    assert max(abs(a[1] - b[1]) for a, b in zip(*metrics)) < TOL
    assert (tmp_path / "ck" / "global_step4" / "optim_tp00_pp00.pt").is_file()

"""Parallel layouts through the real entry points: bad layouts rejected before launch, a PP2 Trainer
run via deepy.py equal to one process (train and eval), and a 2-node loopback launch via a hostfile."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, run_cli, tiny_config_tree, write_config

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("overrides,procs,message", [
    (dict(model_parallel_size=3), 3, "num_attention_heads 4 is not divisible by model_parallel_size 3"),
    (dict(pipe_parallel_size=3), 3, "num_layers 2 is not divisible by pipe_parallel_size 3"),
    (dict(model_parallel_size=2), 3, "world size 3 is not divisible by model_parallel_size 2"),
    (dict(pipe_parallel_size=2, gradient_accumulation_steps=1), 2, "must be >= pipe_parallel_size 2"),
    (dict(pipe_parallel_size=2, gradient_accumulation_steps=2, zero_optimization={"stage": 2}), 2,
     "zero_optimization.stage 2 with pipe_parallel_size 2 is not supported"),
])
def test_bad_layout_rejected_by_deepy_before_launch(tmp_path, overrides, procs, message):
    cfg = write_config(tmp_path / "bad.yml", tiny_config_tree(str(tmp_path / "unused"), **overrides))
    one_line_error(run_cli(["deepy.py", "--num-procs", str(procs), "train.py", cfg], timeout=120), message)


@pytest.mark.parametrize("overrides,message", [
    (dict(pipe_parallel_size=2, gradient_accumulation_steps=1), "must be >= pipe_parallel_size 2"),
    (dict(pipe_parallel_size=2, gradient_accumulation_steps=2, virtual_pipe_stages=2),
     "num_layers 2 is not divisible by pipe_parallel_size 2 x virtual_pipe_stages 2"),
    (dict(pipe_parallel_size=2, gradient_accumulation_steps=2, zero_optimization={"stage": 1}),
     "zero_optimization.stage 1 with pipe_parallel_size 2 is not supported"),
])
def test_bad_pipeline_settings_rejected_before_process_groups(tmp_path, overrides, message):
    cfg = write_config(tmp_path / "bad.yml", tiny_config_tree(str(tmp_path / "unused"), **overrides))
    one_line_error(run_cli(["train.py", cfg], timeout=120), message)


def read_metrics(log_dir, prefix="train"):
    records = [json.loads(ln) for ln in open(f"{log_dir}/metrics.jsonl")]
    return [r[f"{prefix}/loss"] for r in records if f"{prefix}/loss" in r]


@pytest.mark.distributed
def test_pp2_trainer_through_deepy_matches_single_process(tiny_dataset, tmp_path):
    kw = dict(train_iters=4, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=2, eval_interval=2,
              eval_iters=1)
    single = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "one"), **kw)
    pp2 = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "pp2"), pipe_parallel_size=2, **kw)
    out1 = run_cli(["deepy.py", "--num-procs", "1", "train.py", write_config(tmp_path / "one.yml", single)])
    assert out1.returncode == 0, out1.stderr[-2000:]
    out2 = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "train.py",
                    write_config(tmp_path / "pp2.yml", pp2)])
    assert out2.returncode == 0, out2.stderr[-2000:]
    assert "pp=2" in out2.stdout
    for prefix in ("train", "valid"):
        one, two = read_metrics(tmp_path / "one", prefix), read_metrics(tmp_path / "pp2", prefix)
        assert len(one) == len(two) > 0
        assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (prefix, one, two)


@pytest.mark.slow  # CI's slow step; the default tier covers this path elsewhere
@pytest.mark.distributed
def test_two_node_loopback_launch_with_hostfile(tiny_dataset, tmp_path):
    """Two deepy.py launchers (node ranks 0 and 1), one process each, on 127.0.0.1: one DP2 job."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    kw = dict(train_iters=3, train_micro_batch_size_per_gpu=2)
    cfg = write_config(tmp_path / "dp2.yml", tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "two"), **kw))
    port = str(free_port())
    env = dict(os.environ, **ENV)
    procs = [subprocess.Popen([sys.executable, "deepy.py", "--hostfile", str(hostfile), "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", port, "train.py", cfg],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
        assert "resolved config" in stdout
    assert "dp=2" in outs[0][0] and "iter      3/3" in outs[0][0]
    assert "[rank 1 on " in outs[1][0] and "joined: tp rank 0, pp rank 0, dp rank 1" in outs[1][0]
    assert "finished at iteration 3" in outs[1][0]
    single = write_config(tmp_path / "one.yml", tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "one"),
                                                                train_iters=3, train_micro_batch_size_per_gpu=4))
    assert run_cli(["train.py", single]).returncode == 0
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5

"""Faults injected into training runs, as a cluster would inject them: a non-finite step, divergence,
a stop signal (to the process, the launcher, one rank), a dead launcher, a second run on the same
save directory, a rollback. Every subprocess is bounded in time. Checkpoint files, the lock itself
and data faults: tests/test_fault_files.py."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, run_cli, tiny_config_tree, write_config
from fault_helpers import launched_ranks, poison_forward, wait_for_line, wait_gone

from megatron.config import config_from_tree
from megatron.training.guards import TrainingDiverged
from megatron.training.trainer import Trainer

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def strict_json_lines(path) -> list:
    def no_constants(name):
        raise AssertionError(f"{path} holds bare {name}: not JSON")
    return [json.loads(line, parse_constant=no_constants) for line in open(path)]


def make_trainer(tree, logs=None) -> Trainer:
    return Trainer(config_from_tree(tree), log=(logs.append if logs is not None else (lambda m: None)))


# ----------------------------------------------------------------------------- non-finite guard
def test_non_finite_step_makes_no_update_and_is_counted(tiny_dataset, tmp_path):
    save, log_dir = tmp_path / "ckpt", tmp_path / "log"
    tree = tiny_config_tree(tiny_dataset, train_iters=6, save=str(save), checkpoint_factor=4, log_dir=str(log_dir))
    logs = []
    trainer = make_trainer(tree, logs)
    poison_forward(trainer.model, lambda: trainer.iteration + 1 == 4)  # step 4's loss is NaN
    real_step, changed, adam_steps = trainer.engine.train_step, [], []

    def observed_step(micro_batches, lr):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        stats = real_step(micro_batches, lr)
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())))
        adam_steps.append(float(next(iter(trainer.optimizer.state.values()))["step"]))
        return stats

    trainer.engine.train_step = observed_step
    losses = trainer.train()
    assert [math.isnan(x) for x in losses] == [False, False, False, True, False, False]
    assert changed == [True, True, True, False, True, True]  # no weight update at the NaN step
    assert adam_steps == [1, 2, 3, 3, 4, 5]  # nor an optimizer step
    assert any("iter      4 | step skipped, weights not updated: non-finite loss (nan)" in m for m in logs)
    records = {r["iteration"]: r for r in strict_json_lines(log_dir / "metrics.jsonl")}
    assert records[4]["train/loss"] is None and records[4]["train/skipped"] == 1.0
    assert records[6]["train/skipped_steps"] == 1.0 and records[6]["train/loss"] == pytest.approx(losses[5])
    # the save due at step 4 (skipped) waits for the next good step; nothing non-finite on disk
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step5", "global_step6"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(zero_optimization={"stage": 1}), dict(zero_optimization={"stage": 2}),
                                    dict(pipe_parallel_size=2), dict(model_parallel_size=2)],
                         ids=["zero1-dp2", "zero2-dp2", "pp2", "tp2"])
def test_non_finite_step_is_skipped_by_every_engine(layout):
    from distributed_helpers import model_tree
    from fault_helpers import run_with_nan_step

    results = run_with_nan_step(model_tree(gradient_accumulation_steps=2, **layout), world=2, steps=4, nan_step=2)
    for r in results:  # every rank: no update at step 2 (ZeRO: DeepSpeed's own overflow path), updates around it
        assert r["changed"] == [True, False, True, True], r["changed"]
        assert [s.get("skipped") for s in r["stats"]] == [None, 1.0, None, None]
        assert "non-finite" in r["stats"][1]["skip_reason"]


def test_persistent_non_finite_stops_the_run(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    tree = tiny_config_tree(tiny_dataset, train_iters=12, save=str(save), checkpoint_factor=1,
                            keep_last_n_checkpoints=1, max_skipped_steps=3)
    trainer = make_trainer(tree)
    poison_forward(trainer.model, lambda: trainer.iteration + 1 >= 5)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(iterations 5-7\).*global_step4"):
        trainer.train()
    assert (save / "latest").read_text().strip() == "global_step4"  # the newest finite one, kept
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step4"]
    assert not (save / ".lock").exists()


def test_non_finite_weights_are_never_saved(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    trainer = make_trainer(tiny_config_tree(tiny_dataset, train_iters=6, save=str(save), checkpoint_factor=2))
    real_step = trainer.engine.train_step

    def step_then_overflow(micro_batches, lr):  # a finite step whose update overflows a weight
        stats = real_step(micro_batches, lr)
        if trainer.iteration + 1 == 3:
            with torch.no_grad():
                trainer.model.final_norm.weight[0] = float("inf")
        return stats

    trainer.engine.train_step = step_then_overflow
    with pytest.raises(TrainingDiverged, match=r"not saving the checkpoint of iteration 6: weight "
                                               r"final_norm.weight has non-finite values.*global_step2"):
        trainer.train()
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2"]


def test_divergence_through_cli_exits_3_with_one_line(tiny_dataset, tmp_path):
    """The issue's run: lr 1000 diverges; the run stops, latest is finite, metrics stay JSON."""
    save, log_dir = tmp_path / "ckpt", tmp_path / "log"
    tree = tiny_config_tree(tiny_dataset, train_iters=30, save=str(save), checkpoint_factor=1,
                            keep_last_n_checkpoints=1, max_skipped_steps=3, log_dir=str(log_dir),
                            optimizer={"type": "adamw", "params": {"lr": 1000.0}})
    out = run_cli(["train.py", write_config(tmp_path / "c.yml", tree)], timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: 3 consecutive steps"), out.stderr
    latest = save / (save / "latest").read_text().strip()
    state = torch.load(latest / "model_tp00_pp00.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())
    assert any(r.get("train/grad_norm") is None for r in strict_json_lines(log_dir / "metrics.jsonl"))


# ----------------------------------------------------------------------------- stop signals
def start_training(tmp_path, tiny_dataset, argv_prefix, **overrides) -> subprocess.Popen:
    tree = tiny_config_tree(tiny_dataset, **{"train_iters": 2000, "log_interval": 1, **overrides})
    cfg = write_config(tmp_path / "run.yml", tree)
    return subprocess.Popen([sys.executable, *argv_prefix, "train.py", cfg], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def finish(proc: subprocess.Popen, seen: list, timeout: float = 120):
    rest, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + rest, err


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_saves_and_exits_0_and_resume_is_exact(tiny_dataset, tmp_path, sig):
    save, log_dir = tmp_path / "ckpt", tmp_path / "log"
    proc = start_training(tmp_path, tiny_dataset, [], save=str(save), log_dir=str(log_dir))
    seen = []
    wait_for_line(proc, "iter      3/", 120, seen)
    proc.send_signal(sig)
    code, stdout, stderr = finish(proc, seen)
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    stop = [ln for ln in stdout.splitlines() if ln.startswith("stopped by")]
    assert len(stop) == 1 and stop[0].startswith(f"stopped by {sig.name} after iteration "), stdout[-2000:]
    n = int(stop[0].split("after iteration ")[1].split(":")[0])
    assert (save / "latest").read_text().strip() == f"global_step{n}"
    assert sorted(p.name for p in save.iterdir()) == [f"global_step{n}", "latest"]  # no temp dirs, no lock
    before = [r["train/last_loss"] for r in strict_json_lines(log_dir / "metrics.jsonl")]
    # The stopped run plus its resumption equals one uninterrupted run, bit for bit.
    kw = dict(train_iters=2000, exit_interval=n + 3)  # same schedule and data order, stop at n + 3
    full = make_trainer(tiny_config_tree(tiny_dataset, **kw)).train()
    resumed = make_trainer(tiny_config_tree(tiny_dataset, load=str(save), **kw)).train()
    assert len(resumed) == 3 and before[:n] + resumed == full


def test_in_process_trainer_stops_on_a_signal_and_restores_the_handlers(tiny_dataset, tmp_path):
    """In-process (no train.py): the Trainer installs its own handlers for the loop and restores them."""
    tree = tiny_config_tree(tiny_dataset, train_iters=50, save=str(tmp_path / "ckpt"))
    logs = []
    trainer = make_trainer(tree, logs)
    sent = []

    def signal_during_step_3():
        if trainer.iteration == 2 and not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
        return False  # no NaN, only the signal

    poison_forward(trainer.model, signal_during_step_3)
    handler_before = signal.getsignal(signal.SIGTERM)
    losses = trainer.train()
    assert len(losses) == 3 and trainer.iteration == 3
    assert any(m.startswith("stopped by SIGTERM after iteration 3") for m in logs)
    assert signal.getsignal(signal.SIGTERM) is handler_before


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("target", ["launcher SIGINT", "launcher SIGTERM", "rank1 SIGTERM",
                                    "launcher SIGKILL", "torchrun SIGKILL"])
def test_two_rank_run_stops_cleanly_and_leaves_no_orphans(tiny_dataset, tmp_path, target):
    save = tmp_path / "ckpt"
    proc = start_training(tmp_path, tiny_dataset, ["deepy.py", "--num-procs", "2", "--master-port",
                                                   str(free_port())],
                          save=str(save), train_micro_batch_size_per_gpu=2, log_interval=5)
    seen = []
    try:
        wait_for_line(proc, "iter     10/", 180, seen)
        torchrun, *ranks = launched_ranks(proc.pid, 2)
        who, sig = target.split()
        victim = {"launcher": proc.pid, "torchrun": torchrun, "rank1": ranks[1]}[who]
        os.kill(victim, getattr(signal, sig))
        code, stdout, stderr = finish(proc, seen)
    finally:
        if proc.poll() is None:  # the test failed early: do not leave a run behind
            proc.send_signal(signal.SIGKILL)
    assert wait_gone([torchrun, *ranks], 60) == [], "orphan processes left running"
    latest = (save / "latest").read_text().strip()
    n = int(latest[len("global_step"):])
    assert n >= 10 and (save / latest / "manifest.json").is_file()
    assert not list(save.glob(".tmp-*")) and not (save / ".lock").exists()
    if who != "torchrun" and sig != "SIGKILL":  # torchrun itself was not signalled: a clean exit
        assert code == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        assert stdout.count("stopped by ") == 1 and f"after iteration {n}:" in stdout


# ----------------------------------------------------------------------------- save-dir ownership
@pytest.mark.slow  # CI's slow step; the default tier has mr::test_locked_save_dir_two_ranks_is_one_line_and_exit_2
def test_second_run_on_a_locked_save_dir_fails_before_doing_anything(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "started": "earlier", "run": "abc"}
        (save / ".lock").write_text(json.dumps(lock))
        out = run_cli(["train.py", write_config(tmp_path / "c.yml", tiny_config_tree(tiny_dataset, save=str(save)))],
                      timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert f"in use by another run: pid {holder.pid} on host" in lines[0] and "key 'save'" in lines[0]
    assert "training iterations" not in out.stdout
    assert sorted(p.name for p in save.iterdir()) == [".lock"]


@pytest.mark.slow
def test_two_runs_started_together_on_one_save_dir(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    cfgs = [write_config(tmp_path / f"c{k}.yml", tiny_config_tree(tiny_dataset, save=str(save), train_iters=30,
                                                                   checkpoint_factor=5, seed=k))
            for k in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "train.py", c], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cfgs]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    winner = 0 if procs[0].returncode == 0 else 1
    assert "in use by another run" in outs[1 - winner][1]
    manifest = json.loads((save / "global_step30" / "manifest.json").read_text())
    assert manifest["trainer"]["consumed_samples"] == 30 * 4 and manifest["config"]["seed"] == winner + 1


def test_a_run_that_lost_its_lock_stops_saving(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    trainer = make_trainer(tiny_config_tree(tiny_dataset, save=str(save), train_iters=6, checkpoint_factor=2))
    real_step = trainer.engine.train_step

    def step(micro_batches, lr):
        if trainer.iteration == 3:  # someone deleted our lock and another run took the directory
            (save / ".lock").write_text(json.dumps({"pid": 1, "host": "node7", "started": "now", "run": "intruder"}))
        return real_step(micro_batches, lr)

    trainer.engine.train_step = step
    from megatron.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lost ownership .* held by pid 1 on host node7"):
        trainer.train()
    assert sorted(p.name for p in save.iterdir()) == [".lock", "global_step2", "latest"]
    assert json.loads((save / ".lock").read_text())["run"] == "intruder"  # not released: not ours


def test_leftovers_of_a_dead_run_are_cleaned_at_start(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    (save / ".tmp-global_step5-otherhost-123").mkdir(parents=True)
    (save / ".tmp-global_step5-otherhost-123" / "model_tp00_pp00.pt").write_bytes(b"half")
    (save / ".trash-global_step1-9").mkdir()
    logs = []
    make_trainer(tiny_config_tree(tiny_dataset, save=str(save), train_iters=2), logs).train()
    assert sorted(p.name for p in save.iterdir()) == ["global_step2", "latest"]
    assert any("removed 2 leftover(s) of an interrupted run" in m for m in logs)


# ----------------------------------------------------------------------------- rollback / pruning
def test_rollback_keeps_loaded_and_new_checkpoints_and_sets_the_old_branch_aside(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    make_trainer(tiny_config_tree(tiny_dataset, save=str(save), train_iters=8, checkpoint_factor=2)).train()
    old_branch = {s: json.loads((save / f"global_step{s}" / "manifest.json").read_text()) for s in (6, 8)}
    logs = []
    make_trainer(tiny_config_tree(tiny_dataset, save=str(save), load=str(save / "global_step4"), train_iters=7,
                                  checkpoint_factor=2, keep_last_n_checkpoints=2), logs).train()
    # loaded step 4 and this run's last two (6, 7) kept; the older step 2 pruned; latest complete
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step4", "global_step6", "global_step7"]
    assert (save / "latest").read_text().strip() == "global_step7"
    new6 = json.loads((save / "global_step6" / "manifest.json").read_text())
    assert new6["lineage"]["parent"] == "global_step4"
    (aside,) = (save / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["global_step6", "global_step8"]
    for s, manifest in old_branch.items():  # the abandoned branch, intact (not mixed, not pruned)
        assert json.loads((aside / f"global_step{s}" / "manifest.json").read_text()) == manifest
    assert any("moved 2 checkpoint(s) of another history (global_step6, global_step8)" in m for m in logs)
    resumed = make_trainer(tiny_config_tree(tiny_dataset, save=str(save), load=str(save), train_iters=8))
    assert resumed.iteration == 7

"""Faults in runs of two ranks through ``deepy.py --num-procs 2``, as a scheduler sees them: every user
error ends in its one message (printed once, not once per rank), no Python, torch or gloo traceback,
and the documented exit code (2 bad config / data / checkpoint, 3 divergence, 128 + N a rank killed by
signal N); a real crash shows its traceback once. Also the summary rule itself
(megatron/launch/outcome.py) and disk full during a save."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_cli, tiny_config_tree, write_config
from fault_helpers import launched_ranks, wait_for_line

from megatron.config import config_from_tree
from megatron.errors import CheckpointError
from megatron.launch.outcome import CRASH, ERROR, INTERRUPTED, RankStatus, summarize
from megatron.training.trainer import Trainer

NOISE = ("Traceback", "ChildFailedError", "torch.distributed.elastic", "closing signal", "ProcessGroupGloo")


def deepy2(tmp_path: Path, tree: dict, script: str = "train.py", timeout: float = 300):
    cfg = write_config(tmp_path / "run.yml", tree)
    return run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), script, cfg], timeout=timeout)


def assert_one_error(out, code: int, needle: str) -> str:
    """Exit ``code``; stderr is one ``error:`` message (its first line holds ``needle``), nothing else."""
    assert out.returncode == code, out.stderr[-3000:]
    assert not [n for n in NOISE if n in out.stderr or n in out.stdout], out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], out.stderr
    assert out.stderr.strip().startswith(errors[0]), out.stderr  # nothing before it either
    return out.stderr.strip()


def train_in_process(tree: dict) -> None:
    Trainer(config_from_tree(tree), log=lambda m: None).train()


# ----------------------------------------------------------------------------- the summary rule
def status(rank, kind, code, text, t):
    return RankStatus(rank, code, kind, text, t)


def test_summary_names_the_cause_not_its_consequences():
    error = "error: checkpoint '/c/model_tp01_pp00.pt' fails its xxh3_64 checksum"
    # a user error on rank 1; rank 0, stopped by torchrun, reports an early SIGTERM and a gloo crash
    code, lines = summarize({0: 143, 1: 2}, {1: status(1, ERROR, 2, error, 1.0),
                                             0: status(0, INTERRUPTED, 143, "interrupted by SIGTERM", 2.0)})
    assert (code, lines) == (2, [error])
    same = {r: status(r, ERROR, 2, error, 1.0 + r) for r in (0, 1)}  # every rank alike: printed once
    assert summarize({0: 2, 1: 2}, same) == (2, [error])
    diverged = {r: status(r, ERROR, 3, "error: training diverged", 1.0) for r in (0, 1)}
    assert summarize({0: 3, 1: 3}, diverged) == (3, ["error: training diverged"])
    # rank 1 killed (SIGKILL: no record); rank 0's gloo error and torchrun's SIGTERM are consequences
    code, lines = summarize({0: 1, 1: -9}, {0: status(0, CRASH, 1, "Traceback ...\nRuntimeError: gloo", 2.0)})
    assert code == 137 and len(lines) == 1 and lines[0].startswith("error: rank 1 was killed by SIGKILL (signal 9")
    assert summarize({0: -15, 1: -11}, {})[0] == 128 + 11  # SIGSEGV, not the SIGTERM torchrun sent
    # a crash: the first rank's traceback, once
    code, lines = summarize({0: 1, 1: 1}, {1: status(1, CRASH, 1, "Traceback A\nValueError: bug", 1.0),
                                           0: status(0, CRASH, 1, "Traceback B\nRuntimeError: peer gone", 2.0)})
    assert code == 1 and lines == ["rank 1 failed:\nTraceback A\nValueError: bug"]
    assert summarize({}, {}) == (0, [])
    assert summarize({1: 7}, {}) == (7, [])  # a script that prints its own errors: only its exit code


# ----------------------------------------------------------------------------- user errors, two ranks
@pytest.mark.distributed
def test_locked_save_dir_two_ranks_is_one_line_and_exit_2(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / ".lock").write_text(json.dumps({"pid": 1, "host": "node7", "started": "earlier", "run": "abc"}))
    out = deepy2(tmp_path, tiny_config_tree(tiny_dataset, save=str(save)))
    assert_one_error(out, 2, f"checkpoint directory '{save}' (key 'save') is in use by another run: pid 1 on "
                             "host node7")
    assert sorted(p.name for p in save.iterdir()) == [".lock"]


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_data_path_two_ranks_is_one_line_and_exit_2(tiny_dataset, tmp_path):
    out = deepy2(tmp_path, tiny_config_tree(tiny_dataset, data_path=str(tmp_path / "missing")))
    assert_one_error(out, 2, f"data_path '{tmp_path / 'missing'}': file '{tmp_path / 'missing'}.bin' not found")


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_two_ranks_user_error_is_one_line(tiny_dataset, tmp_path):
    """eval.py reports user errors through the same outcome files as train.py: once for both ranks."""
    cfg = write_config(tmp_path / "run.yml", tiny_config_tree(tiny_dataset, load=str(tmp_path / "nothing")))
    out = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "eval.py", cfg,
                   "--tasks", "docs_lambada", "--task-data", str(tmp_path)], timeout=300)
    assert_one_error(out, 2, f"local task docs_lambada: data file '{tmp_path / 'docs_lambada.jsonl'}' not found")


@pytest.mark.slow
@pytest.mark.distributed
def test_divergence_two_ranks_exits_3_with_one_line(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    tree = tiny_config_tree(tiny_dataset, train_iters=30, save=str(save), checkpoint_factor=1, max_skipped_steps=3,
                            optimizer={"type": "adamw", "params": {"lr": 1000.0}})
    assert_one_error(deepy2(tmp_path, tree), 3, "error: training diverged: 3 consecutive steps")
    assert (save / "latest").is_file() and not (save / ".lock").exists()


@pytest.fixture
def saved_run(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    train_in_process(tiny_config_tree(tiny_dataset, save=str(save), train_iters=2))
    return save


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("damage,needle", [
    (lambda step: (step / "model_tp00_pp00.pt").write_bytes((step / "model_tp00_pp00.pt").read_bytes()[:-9] + b"x" * 9),
     "model_tp00_pp00.pt' fails its"),
    (lambda step: (step / "manifest.json").write_text((step / "manifest.json").read_text().replace(
        '"consumed_samples": 8', '"consumed_samples": 3')), "manifest.json' fails its own"),
], ids=["corrupt-shard", "corrupt-manifest"])
def test_corrupt_checkpoint_two_ranks_is_one_line_and_exit_2(tiny_dataset, tmp_path, saved_run, damage, needle):
    damage(saved_run / "global_step2")
    out = deepy2(tmp_path, tiny_config_tree(tiny_dataset, load=str(saved_run), train_iters=4))
    assert_one_error(out, 2, needle)


def test_resume_with_another_shape_names_every_tensor(tiny_dataset, saved_run):
    with pytest.raises(CheckpointError) as err:
        train_in_process(tiny_config_tree(tiny_dataset, load=str(saved_run), train_iters=4, hidden_size=64))
    first, *tensors = str(err.value).splitlines()
    assert "model_tp00_pp00.pt' does not match the model (" in first
    assert "model settings that differ from the checkpoint's: hidden_size 32 -> 64" in first
    assert "  embed.weight: checkpoint [4096, 32], model [4096, 64]" in tensors
    assert "  layers.0.attention.qkv.weight: checkpoint [96, 32], model [192, 64]" in tensors
    assert len(tensors) == 21 and tensors[-1].startswith("  ... and ")  # 20 named, the rest counted


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_with_another_shape_two_ranks_is_one_message_and_exit_2(tiny_dataset, tmp_path, saved_run):
    out = deepy2(tmp_path, tiny_config_tree(tiny_dataset, load=str(saved_run), train_iters=4, num_layers=3))
    first, *tensors = assert_one_error(out, 2, "does not match the model (12 tensor(s) differ; model settings "
                                               "that differ from the checkpoint's: num_layers 2 -> 3)").splitlines()
    assert len(tensors) == 12 and "  layers.2.input_norm.weight: not in the checkpoint, model [32]" in tensors
    assert all(t.startswith("  layers.2.") and ": not in the checkpoint, model [" in t for t in tensors)


# ----------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (needs root and permission to mount); unmounted afterwards."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                              text=True)
    except FileNotFoundError:
        pytest.skip("no 'mount' command to make a small filesystem")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root and mount permission): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_leaving(folder: Path, free_bytes: int) -> None:
    import shutil

    filler = shutil.disk_usage(folder).free - free_bytes
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * filler)


def disk_full_run(tiny_dataset, tmp_path, small_disk, ranks: int):
    """A checkpoint at step 2, then the disk filled to half a checkpoint's space; the resumed run
    saves at step 4."""
    save = small_disk / "ckpt"
    train_in_process(tiny_config_tree(tiny_dataset, save=str(save), train_iters=2))
    size = sum(p.stat().st_size for p in (save / "global_step2").iterdir())
    fill_leaving(small_disk, size // 2)
    tree = tiny_config_tree(tiny_dataset, save=str(save), load=str(save), train_iters=4, checkpoint_factor=2)
    if ranks == 1:
        out = run_cli(["train.py", write_config(tmp_path / "run.yml", tree)], timeout=300)
    else:
        out = deepy2(tmp_path, tree)
    message = assert_one_error(out, 2, f"disk full while saving checkpoint '{save / 'global_step4'}'")
    assert "\n" not in message
    assert re.search(r"it needs about [\d.]+ [KMG]iB \([\d,]+ bytes\), [\d.]+ [KMG]iB \([\d,]+ bytes\) free in "
                     f"'{save}'", message), message
    assert f"'{save / 'latest'}' still names global_step2" in message
    assert sorted(p.name for p in save.iterdir()) == ["global_step2", "latest"]  # temp dir gone, lock released
    assert (save / "latest").read_text().strip() == "global_step2"


def test_disk_full_during_save_is_one_line_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path, small_disk):
    disk_full_run(tiny_dataset, tmp_path, small_disk, ranks=1)


@pytest.mark.slow
@pytest.mark.distributed
def test_disk_full_two_ranks_is_one_line_and_exit_2(tiny_dataset, tmp_path, small_disk):
    disk_full_run(tiny_dataset, tmp_path, small_disk, ranks=2)


# ----------------------------------------------------------------------------- a rank dies, a rank crashes
@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_exits_128_plus_signal_with_one_line(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "run.yml", tiny_config_tree(tiny_dataset, train_iters=2000, save=str(save),
                                                               checkpoint_factor=5, log_interval=5))
    proc = subprocess.Popen([sys.executable, "deepy.py", "--num-procs", "2", "--master-port", str(free_port()),
                             "train.py", cfg], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        wait_for_line(proc, "iter     10/", 180, [])
        _, _, rank1 = launched_ranks(proc.pid, 2)
        os.kill(rank1, signal.SIGKILL)  # as the out-of-memory killer does
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_error(out, 128 + signal.SIGKILL, "error: rank 1 was killed by SIGKILL (signal 9")
    assert (save / (save / "latest").read_text().strip() / "manifest.json").is_file()


CRASHING_TRAIN = """
import os, sys
sys.path.insert(0, {root!r})
import train
from megatron.training.trainer import Trainer

real_step = Trainer.train_step

def train_step(self, micro_batches):
    if os.environ["RANK"] == "1" and self.iteration == 2:
        raise ValueError("a bug on rank 1")
    return real_step(self, micro_batches)

Trainer.train_step = train_step
sys.exit(train.main(exiting=True))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_crash_shows_its_traceback_once(tiny_dataset, tmp_path):
    script = tmp_path / "crashing_train.py"
    script.write_text(CRASHING_TRAIN.format(root=str(ROOT)))
    out = deepy2(tmp_path, tiny_config_tree(tiny_dataset, train_iters=20), script=str(script))
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("Traceback") == 1 and out.stderr.count("ValueError: a bug on rank 1") == 1, out.stderr
    assert out.stderr.strip().startswith("rank 1 failed:\nTraceback (most recent call last):"), out.stderr
    assert "ChildFailedError" not in out.stderr and "closing signal" not in out.stderr

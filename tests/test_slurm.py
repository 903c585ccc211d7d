"""SLURM without a cluster: hostlists, a task's rank environment, the srun command and its dry run,
the requeue decision, the save-dir lock across a requeue, and the Pythia suite's configs (written in
EleutherAI/pythia's dialect under tests/data/pythia/) with their published parameter counts.
The same paths against a real SLURM are in test_slurm_cluster.py (the ``slurm`` tier)."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from megatron.checkpointing.lock import acquire_save_lock
from megatron.config import load_config
from megatron.errors import CheckpointError, ConfigError, LaunchError
from megatron.launch import slurm
from megatron.launch.launcher import NodeCommand
from megatron.training import exit_signals

PYTHIA_DIR = ROOT / "tests" / "data" / "pythia"
# Published totals (untied embeddings; vocabulary 50,277 padded by 128 x model_parallel_size): the
# Pythia README for 70M..12B, the Hugging Face checkpoints for 14M and 31M.
# size: (family file, layers, hidden, heads, model_parallel_size, published)
PYTHIA = {
    "14M": ("pythia_14m_style.yml", 6, 128, 4, 1, 14_067_712),
    "31M": ("pythia_14m_style.yml", 6, 256, 8, 1, 30_494_720),
    "70M": ("pythia_160m_style.yml", 6, 512, 8, 1, 70_426_624),
    "160M": ("pythia_160m_style.yml", 12, 768, 12, 1, 162_322_944),
    "410M": ("pythia_160m_style.yml", 24, 1024, 16, 1, 405_334_016),
    "1B": ("pythia_160m_style.yml", 16, 2048, 8, 1, 1_011_781_632),
    "1.4B": ("pythia_160m_style.yml", 24, 2048, 16, 1, 1_414_647_808),
    "2.8B": ("pythia_160m_style.yml", 32, 2560, 32, 1, 2_775_208_960),
    "6.9B": ("pythia_6.9b_style.yml", 32, 4096, 32, 2, 6_857_302_016),
    "12B": ("pythia_6.9b_style.yml", 36, 5120, 40, 4, 11_846_072_320),
}

# An srun task's environment, as SLURM 22.05 sets it (task 1 of `srun -N2 -n4` in job 4242).
TASK_ENV = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NNODES": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def pythia_config(tmp_path: Path, size: str) -> Path:
    """The size's config: its family file with the shape lines the published files differ in."""
    family, layers, hidden, heads, tp, _ = PYTHIA[size]
    text = (PYTHIA_DIR / family).read_text()
    for key, value in (("num-layers", layers), ("hidden-size", hidden), ("num-attention-heads", heads),
                       ("model-parallel-size", tp)):
        text = re.sub(rf'"{key}": \d+', f'"{key}": {value}', text)
    text = re.sub(r'"attention-config": \[\[\["flash"\], \d+\]\]', f'"attention-config": [[["flash"], {layers}]]',
                  text)
    path = tmp_path / f"pythia-{size}.yml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def neox_tokenizer(tmp_path_factory) -> str:
    """A tokenizer.json with the GPT-NeoX-20B tokenizer's 50,277 entries (what the count depends on)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(50276)}
    vocab["<|endoftext|>"] = 50276
    path = tmp_path_factory.mktemp("neox_tok") / "20B_tokenizer.json"
    Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>")).save(str(path))
    return str(path)


def local_paths(tmp_path: Path, data: str, vocab: str) -> Path:
    """The local overlay a Pythia user writes: their copy of the data and tokenizer."""
    path = tmp_path / "local.yml"
    path.write_text("".join(f'"{k}": ["{data}"]\n' for k in ("train-data-paths", "valid-data-paths",
                                                            "test-data-paths")) + f'"vocab-file": "{vocab}"\n')
    return path


def deepy(argv, capsys):
    spec = importlib.util.spec_from_file_location("deepy_main", ROOT / "deepy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_slurm(monkeypatch):
    """This test runs outside any SLURM job, even when the suite itself runs in one."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)


# ----------------------------------------------------------------------------- hostlists, rank environment
@pytest.mark.parametrize("expr, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu5", ["gpu5"]),
    ("a[8-11],b[1,3]", ["a8", "a9", "a10", "a11", "b1", "b3"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[001-3]", ["n001", "n002", "n003"]),
    ("n[1-2]-[3-4]", ["n1-3", "n1-4", "n2-3", "n2-4"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("login,node[1-2]", ["login", "node1", "node2"]),
])
def test_hostlists_expand_as_scontrol_does(expr, hosts):
    assert slurm.expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr, message", [("node[1-3", "unbalanced '\\['"), ("node]1", "unbalanced '\\]'"),
                                           ("node[3-1]", "descending range 3-1"), ("node[a-b]", "bad range")])
def test_bad_hostlists_are_one_line_naming_the_variable(expr, message):
    with pytest.raises(LaunchError, match=f"SLURM_JOB_NODELIST: {message}"):
        slurm.expand_hostlist(expr, "SLURM_JOB_NODELIST")


def test_a_task_takes_rank_world_and_master_from_slurm():
    asked = []
    env = slurm.rank_environment(TASK_ENV, resolve=lambda node: asked.append(node) or f"{node}.cluster")
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu07.cluster", "MASTER_PORT": str(15000 + 4242)}
    assert asked == ["gpu07"]  # the first node of the step
    # exported MASTER_ADDR / MASTER_PORT win, then the config's
    env = slurm.rank_environment({**TASK_ENV, "MASTER_PORT": "6000"}, master_addr="10.0.0.1", master_port=7000)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "6000")
    # NeoX's fallback when the task counts are missing: nodes x tasks per node
    bare = {k: v for k, v in TASK_ENV.items() if "TASKS" not in k} | {"SLURM_NTASKS_PER_NODE": "2"}
    assert slurm.rank_environment(bare, resolve=str)["WORLD_SIZE"] == "4"


def test_rank_environment_only_for_srun_tasks_without_a_launcher(tmp_path):
    cfg, _ = load_config([str(pythia_config(tmp_path, "160M"))], log=lambda m: None)
    assert cfg.launch.launcher == "slurm" and cfg.launch.deepspeed_slurm
    env = dict(TASK_ENV, MASTER_ADDR="127.0.0.1")
    assert slurm.ranks_from_slurm(cfg.launch, env) and (env["RANK"], env["WORLD_SIZE"]) == ("3", "4")
    batch_script = {k: v for k, v in TASK_ENV.items() if k != "SLURM_STEP_ID"}  # has SLURM_PROCID too
    assert not slurm.ranks_from_slurm(cfg.launch, batch_script) and "RANK" not in batch_script
    torchrun = dict(TASK_ENV, RANK="0")
    assert not slurm.ranks_from_slurm(cfg.launch, torchrun) and torchrun["RANK"] == "0"
    cfg.launch.launcher, cfg.launch.deepspeed_slurm = "torchrun", False
    assert not slurm.ranks_from_slurm(cfg.launch, dict(TASK_ENV))
    assert slurm.ranks_from_slurm(cfg.launch, dict(TASK_ENV, MASTER_ADDR="x", SEPLLM_SRUN_RANKS="1"))  # deepy's srun


# ----------------------------------------------------------------------------- configs and dry runs
@pytest.mark.parametrize("size", PYTHIA)
def test_pythia_configs_dry_run_to_the_published_parameter_count(size, tmp_path, tiny_dataset, neox_tokenizer,
                                                                  capsys, no_slurm):
    """deepy.py --dry-run train.py pythia-SIZE.yml local.yml: the file unchanged, SLURM keys and all."""
    _, layers, _, _, tp, published = PYTHIA[size]
    config, local = pythia_config(tmp_path, size), local_paths(tmp_path, tiny_dataset, neox_tokenizer)
    code, out, err = deepy(["--dry-run", "train.py", str(config), str(local)], capsys)
    assert code == 0, err
    assert f"parameters: {published:,} (" in out
    assert f"attention, layers 0-{layers - 1}: full causal attention" in out
    srun = [ln for ln in out.splitlines() if ln.startswith("srun ")]
    if "launcher: slurm" in out:
        assert len(srun) == 1 and f"--ntasks={tp} " in srun[0] and srun[0].endswith(f"train.py {config} {local}")
    else:  # 14M / 31M set no launcher keys
        assert not srun


def test_dry_run_in_an_allocation_sizes_srun_from_it(tmp_path, tiny_dataset, neox_tokenizer, capsys, no_slurm,
                                                     monkeypatch):
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]",
                       "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "6"}.items():
        monkeypatch.setenv(key, value)
    extra = tmp_path / "cluster.yml"
    extra.write_text('"comment": "neox"\n"account": "proj42"\n"global_num_gpus": 32\n')
    config, local = pythia_config(tmp_path, "1B"), local_paths(tmp_path, tiny_dataset, neox_tokenizer)
    code, out, err = deepy(["--dry-run", "train.py", str(config), str(local), str(extra)], capsys)
    assert code == 0, err
    assert "batch: micro 32 x accumulation 1 x data-parallel 32 = 1024 sequences" in out
    (srun,) = [ln for ln in out.splitlines() if ln.startswith("srun ")]
    assert srun.startswith("srun --nodes=4 --ntasks=32 --ntasks-per-node=8 --kill-on-bad-exit=1 --cpus-per-task=6 "
                           "--comment=neox --account=proj42 ")
    assert "# node 0 (srun in SLURM job 77 on gpu[01-04]: 4 node(s) x 8 task(s))" in out
    extra.write_text('"global_num_gpus": 16\n')  # the allocation starts 32
    code, _, err = deepy(["--dry-run", "train.py", str(config), str(local), str(extra)], capsys)
    assert code == 2 and err.strip() == "error: global_num_gpus 16 != the 32 processes this launch starts " \
                                        "(hostfile slots or num_gpus)"


def test_launcher_slurm_outside_an_allocation_is_one_error_line(tmp_path, tiny_dataset, neox_tokenizer, capsys,
                                                                no_slurm):
    config, local = pythia_config(tmp_path, "70M"), local_paths(tmp_path, tiny_dataset, neox_tokenizer)
    code, out, err = deepy(["train.py", str(config), str(local)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: launcher slurm starts the ranks with srun inside an allocation")


def test_mpi_launchers_are_refused_with_the_alternatives(tmp_path):
    bad = tmp_path / "mpi.yml"
    bad.write_text('"launcher": "openmpi"\n')
    with pytest.raises(ConfigError, match=r"mpi.yml:1: key 'launcher' = 'openmpi' is not supported: MPI "
                                          r"launchers are not supported; use launcher: slurm, pdsh or torchrun"):
        load_config([str(bad)], log=lambda m: None)


# ----------------------------------------------------------------------------- stop, requeue, resume
class FakeScontrol:
    """Records scontrol calls; ``show job`` answers with ``preempt_time``."""

    def __init__(self, preempt_time="None", requeue_rc=0):
        self.calls, self.preempt_time, self.requeue_rc = [], preempt_time, requeue_rc

    def __call__(self, argv, **kwargs):
        self.calls.append(argv[1:])
        if argv[1] == "show":
            return subprocess.CompletedProcess(argv, 0, f"JobId=9 JobState=RUNNING PreemptTime={self.preempt_time}\n",
                                               "")
        return subprocess.CompletedProcess(argv, self.requeue_rc, "", "" if not self.requeue_rc else
                                           "slurm_requeue error: Requested operation is presently disabled")


@pytest.fixture
def restore_stop_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum, preempted, env, requeued", [
    (signal.SIGUSR1, False, {"SLURM_JOB_ID": "9"}, True),  # --signal=B:USR1@N, scancel --signal=USR1
    (signal.SIGTERM, True, {"SLURM_JOB_ID": "9"}, True),  # preemption: PreemptTime is set
    (signal.SIGTERM, False, {"SLURM_JOB_ID": "9"}, False),  # scancel / scontrol requeue: SLURM decides
    (signal.SIGINT, False, {"SLURM_JOB_ID": "9"}, False),
    (signal.SIGUSR1, False, {}, False),  # not in a SLURM job
], ids=["USR1", "TERM preempted", "TERM", "INT", "no job"])
def test_requeue_after_a_checkpointed_stop(signum, preempted, env, requeued, restore_stop_handlers):
    fake, logs = FakeScontrol("2026-01-01T00:00:00" if preempted else "None"), []
    assert slurm.requeue_after_stop(signum, "ckpt", env, logs.append, fake) is requeued
    assert (["requeue", "9"] in fake.calls) is requeued
    assert logs == (["SLURM job 9 requeued: it resumes from the latest checkpoint in ckpt"] if requeued else [])


def test_requeue_refused_or_impossible_says_why(restore_stop_handlers):
    logs = []
    assert not slurm.requeue_after_stop(signal.SIGUSR1, None, {"SLURM_JOB_ID": "9"}, logs.append, FakeScontrol())
    assert logs == ["SLURM job 9 not requeued: no 'save' directory, a requeued run would start over"]
    logs.clear()
    assert not slurm.requeue_after_stop(signal.SIGUSR1, "ckpt", {"SLURM_JOB_ID": "9"}, logs.append,
                                        FakeScontrol(requeue_rc=1))
    assert logs == ["warning: SLURM job 9 could not be requeued (slurm_requeue error: Requested operation is "
                    "presently disabled); submit it again to resume from ckpt"]


def test_a_requeued_run_resumes_from_its_save_directory(tmp_path):
    cfg, _ = load_config([str(pythia_config(tmp_path, "70M"))], log=lambda m: None)
    ck, save = cfg.checkpoint, tmp_path / "ckpt"
    ck.save, ck.load, ck.finetune = str(save), "pretrained/", True
    save.mkdir()
    requeued, logs = {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"}, []
    assert not slurm.resume_requeued_run(ck, requeued, logs.append)  # nothing saved yet: the configs' load
    (save / "latest").write_text("global_step40\n")
    assert not slurm.resume_requeued_run(ck, {"SLURM_JOB_ID": "5"}, logs.append)  # the job's first run
    assert slurm.resume_requeued_run(ck, requeued, logs.append)
    assert (ck.load, ck.finetune) == (str(save), False)
    assert logs == [f"SLURM job 5 was requeued (run 2 of it): resuming from its save directory {save} instead of "
                    "load: pretrained/"]


def test_in_a_slurm_job_a_repeated_stop_signal_does_not_end_the_graceful_stop(monkeypatch):
    """SLURM's stop reaches a task from slurmstepd, srun and deepy.py: the second copy must not kill it."""
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    with exit_signals.deferred_exit_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # outside SLURM: exit 143 at once, nothing saved
        os.kill(os.getpid(), signal.SIGUSR1)
        assert exit_signals.received_signal() == signal.SIGTERM


def write_lock(save: Path, **holder) -> None:
    save.mkdir(exist_ok=True)
    (save / ".lock").write_text(json.dumps({"pid": 4321, "host": "other-node", "started": "earlier", "run": "r0",
                                            **holder}))


def test_the_save_lock_lets_a_requeued_run_of_the_same_job_in(tmp_path, monkeypatch):
    """The earlier run died with its node (no clean release): the lock names another host."""
    save = tmp_path / "ckpt"
    write_lock(save, slurm_job="88", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    logs = []
    lock = acquire_save_lock(str(save), log=logs.append)
    assert (lock.info["slurm_job"], lock.info["slurm_restart"]) == ("88", 1)
    assert logs == [f"checkpoint directory '{save}': took over the stale lock of pid 4321 on host other-node, "
                    "started earlier (run r0, SLURM job 88 (run 0 of it)), an earlier run of this SLURM job, which "
                    "SLURM has ended"]
    lock.release()


@pytest.mark.parametrize("holder, env", [
    ({"slurm_job": "88", "slurm_restart": 1}, {"SLURM_JOB_ID": "88", "SLURM_RESTART_COUNT": "1"}),  # same run
    ({"slurm_job": "87", "slurm_restart": 0}, {"SLURM_JOB_ID": "88", "SLURM_RESTART_COUNT": "1"}),  # another job
    ({}, {"SLURM_JOB_ID": "88", "SLURM_RESTART_COUNT": "1"}),  # a run outside SLURM
    ({"slurm_job": "88", "slurm_restart": 0}, {}),  # we are not in SLURM
], ids=["same run", "other job", "holder outside SLURM", "we outside SLURM"])
def test_the_save_lock_still_refuses_other_runs_on_other_hosts(tmp_path, monkeypatch, holder, env, no_slurm):
    save = tmp_path / "ckpt"
    write_lock(save, **holder)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CheckpointError, match="is in use by another run: pid 4321 on host other-node"):
        acquire_save_lock(str(save), log=lambda m: None)


def test_data_loader_workers_outlive_the_stop_signal_slurm_sends_every_process(no_slurm):
    """SLURM signals every process of a step, the DataLoader's workers too; torch's worker dies of SIGTERM,
    and the rank with it ("DataLoader worker is killed by signal: Terminated") before it could save."""
    import time

    import numpy as np

    from megatron.launch.signals import child_pids
    from megatron.training.batches import train_batches

    samples = [{"text": np.arange(i, i + 9)} for i in range(40)]
    before = set(child_pids(os.getpid()))
    batches = train_batches(samples, 0, 2, 1, 1, 0, num_workers=1, steps=6)
    first = next(batches)
    (worker,) = set(child_pids(os.getpid())) - before
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(worker, s)
    time.sleep(0.5)
    got = [first] + list(batches)
    expected = list(train_batches(samples, 0, 2, 1, 1, 0, num_workers=0, steps=6))
    assert len(got) == 6 and all(a[0].equal(b[0]) for a, b in zip(got, expected))


FAKE_SRUN = """#!/bin/bash
# srun's part in this test: start the command as two tasks of one step here, exit with the worst code
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=0 RANK=0 "$@" & a=$!
SLURM_PROCID=1 RANK=1 "$@" & b=$!
wait $a; ra=$?; wait $b; rb=$?
exit $(( ra > rb ? ra : rb ))
"""


@pytest.mark.parametrize("task, code, stderr", [
    ("sys.exit(report_failure(2, 'error: data_path x: not found'))", 2, "error: data_path x: not found\n"),
    ("sys.exit(report_failure(3, 'error: training diverged', every_rank=False))", 3, "error: training diverged\n"),
    ("sys.exit(0)", 0, ""),
])
def test_srun_tasks_failing_alike_print_one_line(task, code, stderr, tmp_path, monkeypatch, capfd):
    srun, script = tmp_path / "srun", tmp_path / "task.py"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    script.write_text(f"import sys\nfrom megatron.launch.outcome import report_failure\n{task}\n")
    monkeypatch.chdir(tmp_path)
    launch = slurm.SrunLaunch(1, 2, None, {"SLURM_JOB_ID": "5"}, {})
    command = NodeCommand(0, "step", [str(srun), "--ntasks=2", sys.executable, str(script)], remote=False)
    assert launch.run(command, dict(os.environ, PYTHONPATH=str(ROOT))) == code
    assert capfd.readouterr().err == stderr
    assert not list(tmp_path.glob(".sepllm-ranks-*"))  # the outcome folder is gone

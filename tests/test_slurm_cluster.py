"""Training under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and two slurmd on this host):
tools/slurm/train.sbatch runs two ranks on two nodes, `srun python train.py` takes its ranks from SLURM,
a USR1 (to the steps, or to the batch script as `--signal=B:USR1@N` sends it) and a real preemption
stop the run after a checkpoint, the job is requeued and resumes exactly: every loss equals the one of
an uninterrupted two-process deepy.py run.

The ``slurm`` tier (``make test-slurm``): excluded from the default run; needs slurm-wlm and munge
(``apt-get install slurm-wlm munge``) and root, for slurmd.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, TOKENIZER, free_port, tiny_config_tree, write_config
from slurm_cluster import NODES, SlurmCluster, missing

from megatron.launch.slurm import expand_hostlist

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(missing()), reason=f"SLURM is not installed ({', '.join(missing())} not found): "
                                               "apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their users: the test cluster needs root"),
]
TEMPLATE = ROOT / "tools" / "slurm" / "train.sbatch"
PYTHIA = ROOT / "tests" / "data" / "pythia"
ITERS = 150
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: munge's socket path has a length limit
    c = SlurmCluster(root)
    c.env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def losses(log_dir: Path) -> list:
    """Per iteration, in order, the loss of that step (metrics.jsonl, appended to by every run of a job)."""
    records = [json.loads(ln) for ln in open(log_dir / "metrics.jsonl")]
    steps = [(r["iteration"], r["train/last_loss"]) for r in records if "train/last_loss" in r]
    assert [i for i, _ in steps] == list(range(1, len(steps) + 1)), "iterations missing or repeated"
    return [x for _, x in steps]


def submit(cluster, out_dir: Path, *configs: str) -> str:
    """sbatch tools/slurm/train.sbatch CONFIGS, sized for the test cluster (no GPUs, one CPU per node)."""
    return cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                          "--time=20", f"--output={out_dir}/job-%j.out", str(TEMPLATE), *configs, cwd=ROOT)


def output(out_dir: Path, job: str) -> str:
    path = out_dir / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_output(cluster, out_dir: Path, job: str, text: str, timeout: float = 240) -> None:
    cluster.wait(lambda: text in output(out_dir, job) or cluster.job(job).get("JobState") in FINAL, timeout,
                 f"{text!r} in job {job}'s output")
    assert text in output(out_dir, job), output(out_dir, job)[-3000:]


def wait_requeued(cluster, out_dir: Path, job: str) -> None:
    """The job stopped itself after a checkpoint and is queued again: release it (SLURM would wait ~2 min)."""
    info = cluster.wait_state(job, {"PENDING", *FINAL}, 240)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, output(out_dir, job)[-3000:])
    cluster.release(job)


def finished(cluster, out_dir: Path, job: str, timeout: float = 300) -> str:
    info = cluster.wait_state(job, set(FINAL), timeout)
    text = output(out_dir, job)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    return text


def stop_line(text: str) -> tuple:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("stopped by ")]
    m = re.match(r"stopped by (\w+) after iteration (\d+): checkpoint (\S+) saved", line)
    assert m, line
    return m.group(1), int(m.group(2))


def assert_resumed(text: str, job: str, signame: str, save: Path) -> int:
    """One stop by ``signame`` with a checkpoint, one requeue, one resume from that checkpoint."""
    sig, n = stop_line(text)
    assert sig == signame and f"SLURM job {job} requeued: it resumes from the latest checkpoint in {save}" in text
    assert f"SLURM job {job} (run 1) on slurmnode[01-02]" in text
    assert f"resumed from {save} at iteration {n} " in text
    return n


# ----------------------------------------------------------------------------- the tiny run, three ways
@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, tiny_dataset):
    """The tiny config as two deepy.py (torchrun) processes outside SLURM: the losses to match."""
    out = tmp_path_factory.mktemp("reference")
    tree = tiny_config_tree(tiny_dataset, train_iters=ITERS, train_micro_batch_size_per_gpu=2, log_dir=str(out / "log"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run = subprocess.run([sys.executable, "deepy.py", "--num-procs", "2", "--master-port", str(free_port()),
                          "train.py", write_config(out / "c.yml", tree)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(env, OMP_NUM_THREADS="1", WANDB_MODE="disabled"))
    assert run.returncode == 0, run.stderr[-3000:]
    return losses(out / "log")


def tiny_run_config(tmp_path: Path, tiny_dataset: str) -> tuple:
    save = tmp_path / "ckpt"
    tree = tiny_config_tree(tiny_dataset, train_iters=ITERS, train_micro_batch_size_per_gpu=2, save=str(save),
                            log_dir=str(tmp_path / "log"))  # no `load`: a requeued run resumes from `save`
    return write_config(tmp_path / "run.yml", tree), save


def test_cluster_hostlists_match_scontrol(cluster):
    for expr in ("slurmnode[01-02]", "n[098-101],login", "rack[1-2]-n[1-2]", "a[8-11],b[1,3]", "n[1-2]-[3-4]",
                 "n[001-3]", "node[01-03,07]"):
        shown = cluster.run("scontrol", "show", "hostnames", expr).stdout.split()
        assert expand_hostlist(expr) == shown, expr


@pytest.mark.parametrize("target", ["steps", "batch"], ids=["scancel --signal=USR1", "scancel --batch --signal=USR1"])
def test_sbatch_job_trains_like_deepy_and_usr1_requeues_it_to_resume_exactly(cluster, tmp_path, tiny_dataset,
                                                                              tiny_reference, target):
    """A 2-task sbatch job of tools/slurm/train.sbatch gets USR1, to the ranks or to the batch script (what
    #SBATCH --signal=B:USR1@N does; deepy.py passes it on through srun): it saves, stops and requeues itself;
    the requeued job resumes from the checkpoint with no config change. Its losses, both runs together,
    are those of one uninterrupted two-process deepy.py run."""
    config, save = tiny_run_config(tmp_path, tiny_dataset)
    job = submit(cluster, tmp_path, config)
    wait_for_output(cluster, tmp_path, job, "iter      5/")
    cluster.run("scancel", "--signal=USR1", *(["--batch"] if target == "batch" else []), job)
    wait_requeued(cluster, tmp_path, job)
    text = finished(cluster, tmp_path, job)
    n = assert_resumed(text, job, "SIGUSR1", save)
    assert 5 <= n < ITERS and "[rank 1 on " in text and "dp=2" in text  # rank 1 ran on the second node
    assert losses(tmp_path / "log") == tiny_reference
    assert not (save / ".lock").exists() and (save / "latest").read_text().strip() == f"global_step{ITERS}"


# ----------------------------------------------------------------------------- a Pythia config
def pythia_overlay(tmp_path: Path, data: str) -> tuple:
    """cpu_overlay.yml plus this machine's data, tokenizer and checkpoint paths."""
    save = tmp_path / "ckpt"
    text = (PYTHIA / "cpu_overlay.yml").read_text()
    text += "".join(f'"{k}": ["{data}"]\n' for k in ("train-data-paths", "valid-data-paths", "test-data-paths"))
    text += f'"vocab-file": "{TOKENIZER}"\n"save": "{save}"\n"load": "{save}"\n"log-dir": "{tmp_path / "log"}"\n'
    path = tmp_path / "local.yml"
    path.write_text(text)
    return str(path), save


@pytest.fixture(scope="module")
def pythia_srun(cluster, tmp_path_factory, tiny_dataset):
    """`srun -N2 -n2 python train.py pythia.yml local.yml`: no deepy, ranks from deepspeed_slurm."""
    out = tmp_path_factory.mktemp("pythia_srun")
    local, _ = pythia_overlay(out, tiny_dataset)
    run = cluster.run("srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                      sys.executable, "train.py", str(PYTHIA / "pythia_160m_style.yml"), local, timeout=600, cwd=ROOT,
                      check=False)
    return run, losses(out / "log")


def test_srun_with_deepspeed_slurm_trains_two_ranks(pythia_srun):
    run, steps = pythia_srun
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dp=2" in run.stdout and "[rank 1 on " in run.stdout
    assert len(steps) == 120 and "| test loss " in run.stdout


def test_pythia_config_preempted_under_sbatch_requeues_and_resumes_exactly(cluster, tmp_path, tiny_dataset,
                                                                          pythia_srun):
    """A job of the `urgent` partition preempts ours: SIGTERM in the grace time -> checkpoint, stop,
    requeue (inside the grace time SLURM would count the job COMPLETED); it resumes exactly."""
    local, save = pythia_overlay(tmp_path, tiny_dataset)
    job = submit(cluster, tmp_path, str(PYTHIA / "pythia_160m_style.yml"), local)
    wait_for_output(cluster, tmp_path, job, "iter      4/")
    urgent = cluster.sbatch("--partition=urgent", f"--nodes={len(NODES)}", f"--output={tmp_path}/urgent-%j.out",
                            "--wrap", "echo urgent work done")
    wait_requeued(cluster, tmp_path, job)
    assert cluster.wait_state(urgent, set(FINAL), 120)["JobState"] == "COMPLETED"
    text = finished(cluster, tmp_path, job)
    n = assert_resumed(text, job, "SIGTERM", save)
    assert 4 <= n < 120
    assert losses(tmp_path / "log") == pythia_srun[1]

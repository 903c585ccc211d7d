"""A real SLURM cluster on this machine for the ``slurm`` tests: munged, slurmctld and two slurmd
(two node names on this host, one CPU each) started as children of the test process, with their own
key, ports, state and spool directories, and torn down afterwards.

Debian's slurm-wlm (22.05) runs several slurmd on one host (``slurmd -N NAME``). No cgroups:
proctrack/linuxproc, task/none. Two partitions let a test preempt a job for real: ``batch`` (the
default, preemptable with a grace time) and ``urgent`` (a higher priority tier, PreemptMode REQUEUE).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron.launch.signals import set_parent_death_signal

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
NODES = ("slurmnode01", "slurmnode02")
GRACE_S = 60  # preemption grace time: the ranks save and stop within it
KILL_WAIT_S = 30


def find(binary: str) -> Optional[str]:
    return shutil.which(binary) or next((str(p) for p in (Path("/usr/sbin") / binary, Path("/sbin") / binary)
                                         if p.exists()), None)


def missing() -> List[str]:
    return [b for b in DAEMONS + CLIENTS if find(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_test() -> None:  # in the daemon, between fork and exec: SIGTERM when the test process dies
    set_parent_death_signal(signal.SIGTERM)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.procs: List[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.sock"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an outer job's
        self.env["SLURM_CONF"] = str(self.conf)

    # ------------------------------------------------------------------ set-up and tear-down
    def write_conf(self) -> None:
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld, *nodes = (free_port() for _ in range(1 + len(NODES)))
        lines = [
            f"ClusterName=t{os.getpid()}", f"SlurmctldHost={self.host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}", f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n", f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd.%n.pid", f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd.%n.log", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "MailProg=/bin/true", f"KillWait={KILL_WAIT_S}", "MinJobAge=600",
            "JobRequeue=1", "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
        ]
        lines += [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
                  for n, p in zip(NODES, nodes)]
        names = ",".join(NODES)
        lines += [f"PartitionName=batch Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                  f"GraceTime={GRACE_S}",
                  f"PartitionName=urgent Nodes={names} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"]
        self.conf.write_text("\n".join(lines) + "\n")
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o755)

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen([find(name.split("-")[0]), *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, preexec_fn=_die_with_test))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_conf()
        m = self.root / "munge"
        self._daemon("munged", "-F", "--force", f"--socket={self.socket}", f"--key-file={m / 'munge.key'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={m / 'munged.pid'}",
                     f"--seed-file={m / 'munged.seed'}")
        self.wait(lambda: self.socket.exists(), 20, "munged's socket")
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        for node in NODES:
            self._daemon(f"slurmd-{node}", "-D", "-N", node, "-f", str(self.conf))
        self.wait(lambda: self.node_states() == ["idle"] * len(NODES), timeout, "both nodes idle")
        return self

    def stop(self) -> None:
        try:
            for job in self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                self.run("scancel", job, check=False)
            self.wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 2 * KILL_WAIT_S,
                      "an empty queue", fail=False)
        finally:
            for p in reversed(self.procs):
                p.terminate()
            for p in reversed(self.procs):
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # ------------------------------------------------------------------ clients
    def run(self, *argv: str, check: bool = True, timeout: float = 60, cwd: Optional[Path] = None
            ) -> subprocess.CompletedProcess:
        out = subprocess.run([find(argv[0]) or argv[0], *argv[1:]], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=cwd)
        if check and out.returncode:
            raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}\n{self.logs()}")
        return out

    def node_states(self) -> List[str]:
        out = self.run("sinfo", "-h", "-N", "-p", "batch", "-o", "%T", check=False)
        return sorted(out.stdout.split()) if out.returncode == 0 else []

    def sbatch(self, *args: str, cwd: Optional[Path] = None) -> str:
        out = subprocess.run([find("sbatch"), "--parsable", *args], env=self.env, capture_output=True, text=True,
                             timeout=60, cwd=cwd)
        assert out.returncode == 0, f"sbatch failed: {out.stderr.strip()}\n{self.logs()}"
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, PreemptTime, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: str, states, timeout: float) -> Dict[str, str]:
        found: Dict[str, str] = {}

        def reached() -> bool:
            found.update(self.job(job_id))
            return found.get("JobState") in states
        self.wait(reached, timeout, f"job {job_id} in {states} (now {found.get('JobState')})")
        return found

    def release(self, job_id: str) -> None:
        """SLURM holds a requeued job back for about two minutes (BeginTime); let it start now."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait(self, ok: Callable[[], bool], timeout: float, what: str, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return True
            time.sleep(0.2)
        if fail:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
        return False

    def logs(self, tail: int = 15) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

"""SLURM: ranks from an srun step's environment, the srun command deepy.py runs inside an allocation,
stop signals to the step, and requeueing the job after a checkpointed stop.

* ``launcher: slurm``: inside an allocation (``sbatch`` / ``salloc``) deepy.py starts one srun task
  per rank (:class:`SrunLaunch`): nodes from the allocation; tasks per node from ``--num-procs`` /
  ``num_gpus``, else the allocation's ``--ntasks-per-node``, GPUs per node or tasks per node;
  NeoX's ``comment`` / ``account`` become ``--comment`` / ``--account``.
* ``deepspeed_slurm: true`` (implied by ``launcher: slurm`` and by deepy.py's srun): a task of an
  srun step that no launcher gave a ``RANK`` takes RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE
  from SLURM_PROCID / SLURM_LOCALID / the step's task counts, MASTER_ADDR from the first node of the
  step (``MASTER_ADDR`` exported, else the config's ``master_addr``) and MASTER_PORT from the job id
  (``MASTER_PORT`` exported, else ``master_port``), so ``srun python train.py ...`` needs no deepy.
* Stops (:meth:`SrunLaunch.run`): srun answers SIGTERM by killing its tasks at once, so deepy.py
  forwards SIGUSR1 to srun (which passes it on) and SIGTERM / SIGINT / SIGHUP as
  ``scancel --signal=TERM`` to the job's steps; a second signal ends the step at once.
* Outcomes: the tasks record their failure in a folder under the working directory (on the shared
  file system a multi-node job runs from), and deepy.py prints it once with the exit code of the cause,
  as its own launcher does (megatron/launch/outcome.py). A task that cannot reach the folder (a
  node-local working directory) prints its error itself.
* Requeue (:func:`requeue_after_stop`, rank 0, after the checkpoint): a run stopped by SIGUSR1
  (``#SBATCH --signal=B:USR1@N``, ``scancel --signal=USR1``), or by SIGTERM while SLURM is
  preempting the job, runs ``scontrol requeue``; the requeued job resumes from ``latest`` in its
  save directory (:func:`resume_requeued_run`: also when ``load`` is unset or names another
  directory), whose lock lets a later run of the same job in (checkpointing/lock.py). A job that
  exits inside a preemption's grace time would otherwise end COMPLETED and never come back.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional

from megatron.errors import LaunchError
from megatron.launch.launcher import NodeCommand
from megatron.launch.outcome import STATUS_DIR_ENV, command_exit_code, read_statuses, summarize

PORT_BASE, PORT_SPAN = 15000, 10000  # MASTER_PORT from the job id: 15000..24999
FROM_DEEPY_ENV = "SEPLLM_SRUN_RANKS"  # set by deepy.py's srun (``--launcher slurm`` need not be in the config)


# ----------------------------------------------------------------------------- hostlists
def _split_top_level(expr: str, what: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"{what}: nested '[' in hostlist {expr!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"{what}: unbalanced ']' in hostlist {expr!r}")
        elif ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"{what}: unbalanced '[' in hostlist {expr!r}")
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, expr: str, what: str) -> List[str]:
    out: List[str] = []
    for item in body.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"{what}: bad range [{body}] in hostlist {expr!r}")
        hi = hi or lo
        if int(hi) < int(lo):
            raise LaunchError(f"{what}: descending range {item.strip()} in hostlist {expr!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(expr: str, what: str = "hostlist") -> List[str]:
    """``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5, as ``scontrol show hostnames``
    prints it: zero padding kept, several bracket groups in one name expanded left to right."""
    hosts: List[str] = []
    for part in _split_top_level(expr, what):
        names = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            names = [n + text for n in names]
            if body:
                names = [n + r for n in names for r in _expand_range(body, expr, what)]
        hosts += names
    if not hosts:
        raise LaunchError(f"{what}: empty hostlist")
    return hosts


def expand_tasks_per_node(expr: str) -> List[int]:
    """SLURM's ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: List[int] = []
    for item in expr.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"tasks per node: cannot read {expr!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# ----------------------------------------------------------------------------- rank side
def in_srun_step(env: Mapping[str, str] = os.environ) -> bool:
    """A task of an srun step (not the batch script, which has SLURM_PROCID too)."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def provisional_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank before the config is read (which of several processes prints)."""
    if "RANK" in env:
        return int(env["RANK"])
    return int(env["SLURM_PROCID"]) if in_srun_step(env) else 0


def node_address(node: str, run: Callable = subprocess.run) -> str:
    """``node`` when it resolves, else its NodeAddr from ``scontrol show node`` (node names need not be
    host names)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    try:
        out = run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


def rank_environment(env: Mapping[str, str], master_addr: Optional[str] = None,
                     master_port: Optional[int] = None, resolve: Callable[[str], str] = node_address
                     ) -> Dict[str, str]:
    """What torchrun would set, for this srun task: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT."""
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if world is None:
        world = str(int(env["SLURM_NNODES"]) * int(env["SLURM_NTASKS_PER_NODE"]))
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": world}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        out["LOCAL_WORLD_SIZE"] = str(counts[min(int(env.get("SLURM_NODEID", "0")), len(counts) - 1)])
    if env.get("MASTER_ADDR") or master_addr:
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or str(master_addr)
    else:
        what = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
        if what is None:
            raise LaunchError("deepspeed_slurm: SLURM set no node list (SLURM_STEP_NODELIST / SLURM_JOB_NODELIST); "
                              "export MASTER_ADDR or set master_addr")
        out["MASTER_ADDR"] = resolve(expand_hostlist(env[what], what)[0])
    if env.get("MASTER_PORT") or master_port:
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(master_port)
    else:
        out["MASTER_PORT"] = str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return out


def ranks_from_slurm(launch, env: MutableMapping[str, str] = os.environ) -> bool:
    """With ``deepspeed_slurm`` (or ``launcher: slurm``), a task of an srun step that no launcher gave a
    RANK sets the torch.distributed environment from SLURM's. True when it did."""
    wanted = launch.deepspeed_slurm or launch.launcher == "slurm" or env.get(FROM_DEEPY_ENV) == "1"
    if not wanted or not in_srun_step(env) or "RANK" in env:
        return False
    env.update(rank_environment(env, launch.master_addr, launch.master_port))
    return True


# ----------------------------------------------------------------------------- launcher side
@dataclass
class SrunLaunch:
    """deepy.py's srun: ``nodes`` x ``per_node`` tasks, one per rank."""

    nodes: int
    per_node: int
    launch: Any  # the config's LaunchConfig (comment, account)
    env: Dict[str, str]  # the allocation's environment
    overrides: Dict[str, str]  # MASTER_ADDR / MASTER_PORT from deepy's flags

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def job_id(self) -> Optional[str]:
        return self.env.get("SLURM_JOB_ID")

    @classmethod
    def in_allocation(cls, launch, args, default_per_node: int, env: Mapping[str, str]) -> "SrunLaunch":
        """Nodes: the allocation's. Tasks per node: ``--num-procs`` / ``num_gpus``, else what the
        allocation asked for (--ntasks-per-node, GPUs per node, tasks per node). Outside an allocation
        (only ``--dry-run`` gets this far) the sizes come from the config and this machine."""
        per_node = args.num_procs or launch.num_gpus
        if "SLURM_JOB_ID" not in env:
            if not args.dry_run:
                raise LaunchError("launcher slurm starts the ranks with srun inside an allocation: submit with "
                                  "sbatch (tools/slurm/train.sbatch) or run in salloc; or pass --launcher torchrun")
            per_node = per_node or default_per_node
            nodes = max(1, launch.global_num_gpus // per_node) if launch.global_num_gpus else 1
        else:
            nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
            for key in ("SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE"):
                if per_node is None and env.get(key, "").isdigit() and int(env[key]) > 0:
                    per_node = int(env[key])
            if per_node is None and env.get("SLURM_TASKS_PER_NODE"):
                counts = set(expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"]))
                per_node = counts.pop() if len(counts) == 1 else None
        overrides = {k: str(v) for k, v in (("MASTER_ADDR", args.master_addr), ("MASTER_PORT", args.master_port))
                     if v}
        return cls(nodes, per_node or 1, launch, dict(env), overrides)

    def argv(self, script: str, script_args: List[str]) -> List[str]:
        argv = ["srun", f"--nodes={self.nodes}", f"--ntasks={self.world}", f"--ntasks-per-node={self.per_node}",
                "--kill-on-bad-exit=1"]
        if self.env.get("SLURM_CPUS_PER_TASK"):  # srun 22.05+ no longer takes it from the allocation
            argv.append(f"--cpus-per-task={self.env['SLURM_CPUS_PER_TASK']}")
        if self.launch.comment:
            argv.append(f"--comment={self.launch.comment}")
        if self.launch.account:
            argv.append(f"--account={self.launch.account}")
        return argv + [sys.executable, "-u", script, *script_args]

    def commands(self, script: str, script_args: List[str]) -> List[NodeCommand]:
        where = (f"srun in SLURM job {self.job_id} on {self.env.get('SLURM_JOB_NODELIST', '?')}" if self.job_id
                 else "srun, inside an allocation; outside one the sizes are the config's")
        return [NodeCommand(0, f"{where}: {self.nodes} node(s) x {self.per_node} task(s)",
                            self.argv(script, script_args), remote=False)]

    def run(self, command: NodeCommand, env: Dict[str, str]) -> int:
        """Run srun and end in its tasks' one outcome (see the module doc)."""
        status_dir = Path(tempfile.mkdtemp(prefix=f".sepllm-ranks-{self.job_id or 'step'}-", dir=os.getcwd()))
        try:
            code = self._run_step(command, {**env, STATUS_DIR_ENV: str(status_dir)})
            statuses = read_statuses(status_dir)
        finally:
            shutil.rmtree(status_dir, ignore_errors=True)
        if code < 0 and not statuses:  # srun itself was killed
            return command_exit_code(code, "srun")
        code, lines = summarize({0: code} if code else {}, statuses)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return code

    def _run_step(self, command: NodeCommand, env: Dict[str, str]) -> int:
        """Run srun; stop signals reach its tasks without srun killing them (see the module doc)."""
        proc = subprocess.Popen(command.argv, env={**env, **self.overrides, FROM_DEEPY_ENV: "1"},
                                start_new_session=True)
        received: List[int] = []
        helpers: List[subprocess.Popen] = []

        def forward(signum, frame) -> None:
            received.append(signum)
            if len(received) > 1:
                proc.send_signal(signal.SIGTERM)  # srun ends the step now
            elif signum == signal.SIGUSR1:
                proc.send_signal(signal.SIGUSR1)  # srun passes it on to every task
            else:  # not waited for: while SLURM itself ends the job, scancel retries for a long while
                helpers.append(subprocess.Popen(["scancel", "--signal=TERM", str(self.job_id)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                                            signal.SIGHUP)}
        try:
            return proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for helper in helpers:  # the step is over: a scancel still retrying would hold the job up
                if helper.poll() is None:
                    helper.kill()
                helper.wait()


# ----------------------------------------------------------------------------- requeue
def resume_requeued_run(checkpoint, env: Mapping[str, str] = os.environ, log: Callable[[str], None] = print
                        ) -> bool:
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0) continues its own run: once its ``save`` directory
    holds a checkpoint, that is what it loads, fully (``finetune`` off), whatever ``load`` says -- the
    configs describe the job's first run. True when it changed ``load``."""
    from megatron.checkpointing.checkpoint import LATEST

    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    save = checkpoint.save
    if not restarts or not save or not (Path(save) / LATEST).is_file():
        return False
    if checkpoint.load == save and not checkpoint.finetune:
        return False
    log(f"SLURM job {env.get('SLURM_JOB_ID')} was requeued (run {restarts} of it): resuming from its save "
        f"directory {save}" + (f" instead of load: {checkpoint.load}" if checkpoint.load else ""))
    checkpoint.load, checkpoint.finetune = save, False
    return True


def _scontrol(args: List[str], run: Callable) -> subprocess.CompletedProcess:
    return run(["scontrol", *args], capture_output=True, text=True, timeout=60)


def being_preempted(job_id: str, run: Callable = subprocess.run) -> bool:
    """SLURM has chosen this job for preemption (``PreemptTime`` set; the job is in its grace time)."""
    try:
        out = _scontrol(["show", "job", "-o", job_id], run).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.search(r"\bPreemptTime=(\S+)", out)
    return bool(m) and m.group(1) not in ("None", "Unknown")


def requeue_after_stop(signum: int, save: Optional[str], env: Mapping[str, str] = os.environ,
                       log: Callable[[str], None] = print, run: Callable = subprocess.run) -> bool:
    """After a checkpointed stop in a SLURM job: requeue it when the stop was SIGUSR1, or SIGTERM during
    a preemption. True when requeued. Rank 0 only, after the checkpoint is complete."""
    job = env.get("SLURM_JOB_ID")
    if not job or signum not in (signal.SIGUSR1, signal.SIGTERM):
        return False
    if signum == signal.SIGTERM and not being_preempted(job, run):
        return False  # scancel, or SLURM requeues the job itself (scontrol requeue, preemption without grace)
    if not save:
        log(f"SLURM job {job} not requeued: no 'save' directory, a requeued run would start over")
        return False
    # SLURM answers the requeue with SIGTERM to the job: nothing is left to do here but exit.
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    try:
        out = _scontrol(["requeue", job], run)
        ok, why = out.returncode == 0, (out.stderr or out.stdout).strip()
    except (OSError, subprocess.SubprocessError) as e:
        ok, why = False, str(e)
    if ok:
        log(f"SLURM job {job} requeued: it resumes from the latest checkpoint in {save}")
    else:
        log(f"warning: SLURM job {job} could not be requeued ({why or 'scontrol failed'}); submit it again "
            f"to resume from {save}")
    return ok

"""Signals between the launcher (deepy.py), torchrun and the ranks: forwarded stops, no orphans.

Launcher side (:func:`start_local`, :class:`SignalForwarder`):
  * every local command starts in its own session, so a terminal's Ctrl-C reaches deepy.py alone
    (torchrun would otherwise catch it too, kill the ranks after 30 s and print tracebacks);
  * SIGTERM / SIGINT / SIGUSR1 to deepy.py (SIGHUP as SIGTERM) are forwarded to the ranks
    themselves (the children of each local torchrun, or the single training process), which save a
    checkpoint and stop after the current step (megatron.training.exit_signals); a second signal
    is forwarded too and stops them at once;
  * each child gets ``PR_SET_PDEATHSIG = SIGTERM`` (Linux): if deepy.py dies, even by SIGKILL,
    torchrun gets SIGTERM and stops its ranks (it SIGKILLs them after 30 s).

Rank side (:func:`die_with_parent`, called by train.py when started by a launcher): when its parent
(torchrun, deepy.py) dies, even by SIGKILL, the rank sends itself one SIGTERM, so it saves and stops,
and ends for good ``grace`` seconds later if that graceful stop is stuck (e.g. in a collective with
a peer that is gone). The death is noticed through ``PR_SET_PDEATHSIG`` (Linux, immediate) and a
watchdog thread that polls the parent pid (everywhere; also covers a parent that died before the
death signal was set).

Remote nodes started over ssh are not reached by forwarding: there the scheduler signals each
node's ranks (SLURM does), and the ranks agree on the stop among themselves.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
LAUNCHER_ENV = "SEPLLM_LAUNCHER_PID"
ORPHAN_GRACE_ENV = "SEPLLM_ORPHAN_GRACE_S"


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _child_setup(parent_pid: int):
    def setup() -> None:  # runs in the child between fork and exec
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent_pid:  # the launcher died before the death signal was set
            os._exit(1)
    return setup


def start_local(argv, env: Dict[str, str], shell: bool = False) -> subprocess.Popen:
    """Start a command in its own session that gets SIGTERM when this launcher dies."""
    env = dict(env, **{LAUNCHER_ENV: str(os.getpid())})
    return subprocess.Popen(argv, shell=shell, env=env, start_new_session=True,
                            preexec_fn=_child_setup(os.getpid()))


def child_pids(pid: int) -> List[int]:
    """Direct children of ``pid`` (Linux /proc; psutil elsewhere)."""
    task_children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(x) for x in task_children.read_text().split()]
    except OSError:
        pass
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children()]
    except Exception:  # no psutil, or the process is gone
        return []


def is_torchrun(argv: Sequence[str]) -> bool:
    torchrun_modules = ("torch.distributed.run", "megatron.launch.node_agent")
    return any(m in argv for m in torchrun_modules) or any(Path(a).name == "torchrun" for a in argv[:1])


class SignalForwarder:
    """Forward stop signals to the ranks of the started commands (use as a context manager)."""

    def __init__(self, procs: List[subprocess.Popen], argvs: List[Sequence[str]]):
        self.procs, self.argvs = procs, argvs
        self.previous: Dict[int, object] = {}
        self.received: List[int] = []

    def rank_pids(self) -> List[int]:
        pids = []
        for proc, argv in zip(self.procs, self.argvs):
            if proc.poll() is not None:
                continue
            kids = child_pids(proc.pid) if is_torchrun(argv) else []
            pids.extend(kids or [proc.pid])  # no ranks yet: torchrun itself (it stops cleanly)
        return pids

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        sig = signal.SIGTERM if signum == signal.SIGHUP else signum
        for pid in self.rank_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "SignalForwarder":
        for s in FORWARDED:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def wait_all(procs: List[subprocess.Popen], argvs: List[Sequence[str]]) -> int:
    """Wait for every command, forwarding stop signals; the first non-zero exit code, else 0."""
    with SignalForwarder(procs, argvs):
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


# ----------------------------------------------------------------------------- rank side
PARENT_DEATH_SIGNAL = signal.SIGUSR2
_parent: Dict[str, object] = {"pid": None, "gone": False, "grace": 120.0}


def _parent_gone() -> None:
    """Once: stop gracefully (SIGTERM to this process), and for good ``grace`` seconds later."""
    if _parent["gone"]:
        return
    _parent["gone"] = True
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_exit_after_grace, name="orphan-deadline", daemon=True).start()


def _exit_after_grace() -> None:
    grace = float(_parent["grace"])
    time.sleep(grace)
    print(f"[pid {os.getpid()}] launcher gone and no clean stop within {grace:.0f} s: exiting",
          file=sys.stderr, flush=True)
    os._exit(143)


def _on_parent_death_signal(signum, frame) -> None:
    # The kernel sends the death signal when the parent *thread* that started us exits, possibly
    # more than once for a multi-threaded parent (torchrun): act only once the parent process is gone.
    if os.getppid() != _parent["pid"]:
        _parent_gone()


def _watch_parent() -> None:
    while os.getppid() == _parent["pid"]:
        time.sleep(0.5)
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)  # handled in the main thread, like the kernel's signal


def die_with_parent(grace: Optional[float] = None) -> None:
    """This rank stops (SIGTERM: save and exit) when its launcher dies, and is gone ``grace`` s later."""
    _parent["grace"] = float(os.environ.get(ORPHAN_GRACE_ENV, "120")) if grace is None else grace
    launcher = os.environ.get(LAUNCHER_ENV)
    # A direct child of deepy.py knows its parent's pid (so a launcher that died before this line is
    # noticed); a torchrun child takes the parent it has now.
    _parent["pid"] = int(launcher) if launcher and "LOCAL_RANK" not in os.environ else os.getppid()
    signal.signal(PARENT_DEATH_SIGNAL, _on_parent_death_signal)
    set_parent_death_signal(PARENT_DEATH_SIGNAL)  # immediate on Linux; the watchdog covers the rest
    threading.Thread(target=_watch_parent, name="parent-watchdog", daemon=True).start()


def launched_by_launcher() -> bool:
    """Started by deepy.py, torchrun or the deepspeed launcher (not by hand from a shell)."""
    return LAUNCHER_ENV in os.environ or "LOCAL_RANK" in os.environ

"""Ownership of a ``save:`` directory: one run at a time, stale locks of dead runs taken over.

``SAVE/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds JSON: the
holder's pid, host, start time, process start tick (to tell a reused pid from the holder) and a run
id. A second run finds the file and fails naming the holder. A lock whose holder is dead on this host
(no such pid, or a pid reused by another process) is stale: it is renamed away (only one contender's
rename succeeds), re-read to confirm it is the stale one, and replaced. A lock held from another host
is never taken over automatically (its pid cannot be checked from here): the message says to delete
the file if that run is gone -- unless it was taken by an earlier run of this same SLURM job (the lock
records SLURM_JOB_ID and SLURM_RESTART_COUNT): SLURM requeues a job only once it has ended, so that
holder is gone, on whichever node it ran. The lock is released at the end of the run (and at
interpreter exit).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from megatron.errors import CheckpointError

LOCK_NAME = ".lock"


def process_start_tick(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def pid_alive(pid: int, start_tick: Optional[int] = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start_tick is not None:
        now = process_start_tick(pid)
        if now is not None and now != start_tick:
            return False  # the pid was reused by a newer process
    return True


def describe(holder: Dict[str, Any]) -> str:
    job = (f", SLURM job {holder['slurm_job']} (run {holder.get('slurm_restart', 0)} of it)"
           if holder.get("slurm_job") else "")
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            f" (run {holder.get('run')}{job})")


def slurm_run() -> Dict[str, Any]:
    """This process's SLURM job and how often SLURM has requeued it ({} outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}


def _earlier_run_of_this_job(holder: Dict[str, Any], ours: Dict[str, Any]) -> bool:
    restart = holder.get("slurm_restart")
    return (bool(ours) and holder.get("slurm_job") == ours["slurm_job"] and isinstance(restart, int)
            and restart < ours["slurm_restart"])


class SaveDirLock:
    """Held lock on ``save_dir``; ``release()`` removes it if it is still ours."""

    def __init__(self, path: Path, info: Dict[str, Any]):
        self.path, self.info = path, info
        self.run_id: str = info["run"]
        atexit.register(self.release)

    def holder(self) -> Optional[Dict[str, Any]]:
        return _read_holder(self.path)

    def check_held(self) -> None:
        """Fail (before writing anything) when another run has taken this directory over."""
        holder = self.holder()
        if holder is None or holder.get("run") != self.run_id:
            now = describe(holder) if holder else "nobody (the lock file is gone)"
            raise CheckpointError(f"lost ownership of checkpoint directory '{self.path.parent}': its lock "
                                  f"{self.path} is now held by {now}; not saving into it")

    def release(self) -> None:
        holder = _read_holder(self.path)
        if holder is not None and holder.get("run") == self.run_id:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        atexit.unregister(self.release)


def _read_holder(path: Path) -> Optional[Dict[str, Any]]:
    """The lock file's JSON; None when absent; {} when unreadable (being written, or garbage)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_stale(holder: Dict[str, Any], host: str) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == host and isinstance(pid, int) and not pid_alive(pid, holder.get("start_tick"))


def _try_create(path: Path, info: Dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over_stale(path: Path, stale: Dict[str, Any], log: Callable[[str], None],
                     why: str = "which is no longer running") -> None:
    """Move a stale lock aside; if what was moved turns out to be a live lock (a race), put it back."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another contender moved it first
    moved = _read_holder(aside) or {}
    if moved.get("run") != stale.get("run"):
        try:
            os.link(aside, path)  # restore the live lock we grabbed by mistake
        except FileExistsError:
            pass
        aside.unlink()
        return
    aside.unlink()
    log(f"checkpoint directory '{path.parent}': took over the stale lock of {describe(stale)}, {why}")


def acquire_save_lock(save_dir: str, log: Callable[[str], None] = print, wait_unreadable: float = 2.0
                      ) -> SaveDirLock:
    """Lock ``save_dir`` for this process or raise CheckpointError naming the holder."""
    path = Path(save_dir) / LOCK_NAME
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "start_tick": process_start_tick(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "run": uuid.uuid4().hex[:12], **slurm_run()}
    deadline = time.monotonic() + wait_unreadable
    while True:
        if _try_create(path, info):
            return SaveDirLock(path, info)
        holder = _read_holder(path)
        if holder is None:
            continue  # released between our attempt and the read
        if not holder:  # being written by its creator right now, or garbage
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise CheckpointError(f"checkpoint directory '{save_dir}' (key 'save') has an unreadable lock "
                                  f"file {path}; if no run uses this directory, delete it")
        if holder.get("pid") == os.getpid() and holder.get("host") == host:
            path.unlink(missing_ok=True)  # left by an earlier run in this same process
            continue
        if _is_stale(holder, host):
            _take_over_stale(path, holder, log)
            continue
        if holder.get("host") != host and _earlier_run_of_this_job(holder, slurm_run()):  # this host: _is_stale decided
            _take_over_stale(path, holder, log, "an earlier run of this SLURM job, which SLURM has ended")
            continue
        raise CheckpointError(f"checkpoint directory '{save_dir}' (key 'save') is in use by another run: "
                              f"{describe(holder)}; lock file {path}. Wait for that run, use another 'save' "
                              "directory, or delete the lock file if that run is gone")

"""A training run's tenure of its ``save:`` directory: ownership, leftovers, lineage and pruning.

* **Ownership**: global rank 0 takes the directory lock (``megatron.checkpointing.lock``) before
  training; every rank learns the outcome, so a second run on the same directory stops on all ranks
  before doing anything, naming the holder.
* **Leftovers**: with the lock held, every ``.tmp-*`` / ``.old-*`` / ``.trash-*`` entry belongs to
  a dead run and is removed at start.
* **Lineage**: the checkpoints of this run's history are the one it loaded from this directory, the
  ones before it, and the ones it writes. Any other ``global_stepN`` here (the abandoned branch after
  a rollback: steps above the loaded one; or everything, for a run that loaded nothing from here) is
  moved to ``SAVE/abandoned/<time>-<run>/`` at the run's first save, with one log line: kept, never
  mixed with this run's checkpoints, never pruned. ``latest`` is redirected to the loaded checkpoint
  before anything it names is moved, so it always names a complete checkpoint.
* **Pruning** (``keep_last_n_checkpoints``): keeps the last N checkpoints this run wrote and the one
  it loaded; the others of the lineage go (renamed to ``.trash-*`` first, so a half-deleted
  checkpoint never sits under a checkpoint name).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional

from megatron.checkpointing.integrity import fsync_dir, write_text
from megatron.checkpointing.lock import SaveDirLock, acquire_save_lock
from megatron.errors import CheckpointError
from megatron.parallel.distributed import rank0_decides

STEP_PREFIX = "global_step"
ABANDONED = "abandoned"
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".trash-", ".lock.stale-")


def step_of(path: Path) -> Optional[int]:
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def checkpoint_steps(root: Path) -> List[int]:
    return sorted(s for s in (step_of(p) for p in root.glob(STEP_PREFIX + "*") if p.is_dir()) if s is not None)


def remove_checkpoint_dir(path: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: Path, log: Callable[[str], None]) -> None:
    """Temporary entries of dead runs (call with the lock held: no live run owns them)."""
    stale = [p for p in root.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log(f"checkpoint directory '{root}': removed {len(stale)} leftover(s) of an interrupted run: "
            f"{', '.join(sorted(p.name for p in stale)[:4])}{' ...' if len(stale) > 4 else ''}")


class SaveSession:
    """Every rank holds one (collective to open); rank 0 does the filesystem work."""

    def __init__(self, root: Path, lock: Optional[SaveDirLock], run_id: str, loaded_step: Optional[int],
                 log: Callable[[str], None]):
        self.root, self.lock, self.run_id, self.loaded_step, self.log = root, lock, run_id, loaded_step, log
        self.written: List[int] = []

    @classmethod
    def open(cls, save_dir: str, loaded_ckpt: Optional[Path], log: Callable[[str], None] = print
             ) -> "SaveSession":
        """Lock ``save_dir`` and clean it; ``loaded_ckpt`` is the checkpoint this run resumed from."""
        root = Path(save_dir)
        loaded_step = None
        if loaded_ckpt is not None and Path(loaded_ckpt).resolve().parent == root.resolve():
            loaded_step = step_of(Path(loaded_ckpt))
        lock: Optional[SaveDirLock] = None

        def take() -> str:
            nonlocal lock
            lock = acquire_save_lock(save_dir, log)
            try:
                clean_leftovers(root, log)
            except CheckpointError:
                lock.release()
                raise
            return lock.run_id

        run_id = rank0_decides(take)
        return cls(root, lock, run_id, loaded_step, log)

    @property
    def parent(self) -> Optional[str]:
        """The checkpoint the next one continues from (recorded in its manifest)."""
        step = self.written[-1] if self.written else self.loaded_step
        return None if step is None else f"{STEP_PREFIX}{step}"

    def in_lineage(self, step: int) -> bool:
        return step in self.written or (self.loaded_step is not None and step <= self.loaded_step)

    def before_publish(self) -> None:
        """Rank 0, before renaming a new checkpoint into place: other histories set aside."""
        foreign = [s for s in checkpoint_steps(self.root) if not self.in_lineage(s)]
        if foreign:
            self._set_aside(foreign)

    def _set_aside(self, steps: List[int]) -> None:
        latest = self.root / "latest"
        names = {f"{STEP_PREFIX}{s}" for s in steps}
        if latest.is_file() and latest.read_text().strip() in names:
            if self.loaded_step is not None:
                write_text(latest, f"{STEP_PREFIX}{self.loaded_step}\n")
            else:
                latest.unlink()
        origin = f"after-step{self.loaded_step}" if self.loaded_step is not None else "before-run"
        dest = self.root / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{origin}-{self.run_id}"
        dest.mkdir(parents=True, exist_ok=True)
        for s in steps:
            os.replace(self.root / f"{STEP_PREFIX}{s}", dest / f"{STEP_PREFIX}{s}")
        fsync_dir(self.root)
        continues = (f"continues from {STEP_PREFIX}{self.loaded_step}" if self.loaded_step is not None
                     else "did not load a checkpoint from this directory")
        shown = ", ".join(f"{STEP_PREFIX}{s}" for s in steps[:4]) + (" ..." if len(steps) > 4 else "")
        self.log(f"checkpoint directory '{self.root}': this run {continues}; moved {len(steps)} checkpoint(s) "
                 f"of another history ({shown}) to {dest} (kept, not mixed with this run's)")

    def after_publish(self, iteration: int, keep_last: Optional[int]) -> None:
        """Rank 0, once ``latest`` names the new checkpoint: record it and prune."""
        self.record(iteration)
        if not keep_last:
            return
        keep = set(self.written[-keep_last:])
        if self.loaded_step is not None:
            keep.add(self.loaded_step)
        for s in checkpoint_steps(self.root):
            if s not in keep:
                remove_checkpoint_dir(self.root / f"{STEP_PREFIX}{s}")

    def record(self, iteration: int) -> None:
        """Note a checkpoint this run wrote (every rank; rank 0 through ``after_publish``)."""
        if iteration not in self.written:
            self.written.append(iteration)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

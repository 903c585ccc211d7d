"""Checkpoints: per-rank shards plus a manifest, written atomically.

Layout of ``SAVE/global_stepN/``::

    manifest.json          iteration, consumed samples, layout (tp, pp, dp, cp), config, shard metadata
    model_tp00_pp00.pt     model state of tensor rank 0 / pipeline stage 0 (written by dp and cp rank 0)
    optim_tp00_pp00.pt     optimizer state of that shard, keyed by parameter name
    meta_tp00_pp00.json    shape and tensor-parallel dim of every parameter of that shard
    rng_rank00000.pt       RNG states of each global rank

Every rank writes into ``SAVE/.tmp-global_stepN-<host>-<pid>`` (unique per run; rank 0 names it);
each file is hashed while written and fsynced, and the manifest records every file's size and
checksum (``megatron.checkpointing.integrity``). After all ranks are done, rank 0 fsyncs the
directory, renames it to its final name and then atomically rewrites ``SAVE/latest``. A crash at any
point leaves the previous checkpoint and ``latest`` untouched. With a ``SaveSession`` (the Trainer's),
the run owns the directory and prunes by lineage (``megatron.checkpointing.session``). Loading
verifies each file's size and checksum (one clear error naming the file).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, NoReturn, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpointing.integrity import (
    FORMAT_VERSION,
    atomic_write_text,
    fsync_dir,
    load_shard,
    read_json_file,
    read_manifest_file,
    signed_json,
    write_shard,
    write_signed_json,
)
from megatron.checkpointing.session import SaveSession, checkpoint_steps, remove_checkpoint_dir
from megatron.errors import CheckpointError
from megatron.parallel import ParallelLayout
from megatron.parallel.distributed import rank as global_rank
from megatron.parallel.distributed import rank0_decides, world_size

MANIFEST = "manifest.json"
LATEST = "latest"
NamedState = Dict[str, Any]


def shard_name(kind: str, tp_rank: int, pp_rank: int) -> str:
    return f"{kind}_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def step_dir_name(iteration: int) -> str:
    return f"global_step{iteration}"


def ensure_writable(save_dir: str) -> None:
    """Fail early (before training) when the checkpoint directory cannot be written."""
    path = Path(save_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint directory '{save_dir}' (key 'save') is not writable: "
                              f"{e.strerror or e}") from None


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shard_metadata(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    return {name: {"shape": list(p.shape), "tp_dim": getattr(p, "tensor_parallel_dim", None)}
            for name, p in model.named_parameters()}


def layout_of(model: torch.nn.Module) -> ParallelLayout:
    """The layout a model was built for (a plain module is one rank)."""
    return getattr(model, "layout", None) or ParallelLayout()


def save_checkpoint(save_dir: str, iteration: int, model: torch.nn.Module, optimizer_state: Optional[NamedState],
                    extra: Dict[str, Any], config_tree: Dict[str, Any], keep_last: Optional[int] = None,
                    session: Optional[SaveSession] = None) -> Path:
    """Collective: every rank calls it. ``optimizer_state`` is this shard's named optimizer state (the
    engine's ``optimizer_state()``), ``extra`` holds trainer state (consumed samples, ...). ``session``
    (the Trainer's): ownership check, lineage set-aside and pruning; without one, ``keep_last`` keeps
    the highest step numbers (and always the one just written). A write that fails on any rank (disk
    full, ...) removes the temporary directory and raises the same CheckpointError on every rank;
    ``latest`` still names the previous checkpoint."""
    st = layout_of(model)
    root = Path(save_dir)
    final = root / step_dir_name(iteration)
    tmp = _make_tmp_dir(root, iteration, session)
    files, failure = _write_rank_files(tmp, st, model, optimizer_state)
    estimate = _estimated_bytes((model.state_dict(), optimizer_state)) if st.dp_rank == 0 and st.cp_rank == 0 else 0
    files = _all_written(files, failure, estimate, tmp, final)

    def write_manifest_and_publish() -> None:
        manifest = {
            "format_version": FORMAT_VERSION, "iteration": iteration,
            "layout": {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "cp": st.cp_size},
            "config": config_tree, "trainer": extra,
            "has_optimizer": optimizer_state is not None,
            "files": files,
        }
        if session is not None:
            manifest["lineage"] = {"parent": session.parent, "run": session.run_id}
        try:
            atomic_write_text(tmp / MANIFEST, signed_json(manifest, indent=1))
            if session is not None:
                session.before_publish()
            publish(tmp, root, iteration)
        except OSError as e:
            _fail_save(tmp, final, {"path": str(tmp / MANIFEST), "errno": e.errno, "strerror": e.strerror or str(e)}, 0)
        if session is not None:
            session.after_publish(iteration, keep_last)
        elif keep_last:
            prune_checkpoints(root, keep_last, protect=iteration)

    rank0_decides(write_manifest_and_publish)  # every rank waits for it, and learns of its failure
    if session is not None:
        session.record(iteration)
    return final


def _write_rank_files(tmp: Path, st: ParallelLayout, model: torch.nn.Module, optimizer_state: Optional[NamedState]
                      ) -> Tuple[Dict[str, Dict[str, Any]], Optional[Dict[str, Any]]]:
    """This rank's files (digest records), or the write that failed: {path, errno, strerror}."""
    files: Dict[str, Dict[str, Any]] = {}
    writing = tmp
    try:
        if st.dp_rank == 0 and st.cp_rank == 0:  # one writer per (tp, pp) shard; the rest are replicas
            writing = tmp / shard_name("model", st.tp_rank, st.pp_rank)
            files.update(write_shard(model.state_dict(), writing))
            if optimizer_state is not None:
                writing = tmp / shard_name("optim", st.tp_rank, st.pp_rank)
                files.update(write_shard(optimizer_state, writing))
            writing = tmp / f"meta_tp{st.tp_rank:02d}_pp{st.pp_rank:02d}.json"
            files.update(write_signed_json(writing, {"params": shard_metadata(model)}))
        writing = tmp / f"rng_rank{global_rank():05d}.pt"
        files.update(write_shard(rng_state(), writing))
    except OSError as e:
        return files, {"path": str(writing), "errno": e.errno, "strerror": e.strerror or str(e)}
    return files, None


def _estimated_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists): about what torch.save writes."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _all_written(files: Dict[str, Dict[str, Any]], failure: Optional[Dict[str, Any]], estimate: int, tmp: Path,
                 final: Path) -> Dict[str, Dict[str, Any]]:
    """Collective: every rank's file records merged, or, when a write failed on any rank, the
    temporary directory removed and the same CheckpointError raised on every rank."""
    parts = [(files, failure, estimate)]
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, (files, failure, estimate))
    failures = [f for _, f, _ in parts if f is not None]
    if failures:
        needed = sum(e for _, _, e in parts) + SMALL_FILES_BYTES * len(parts)
        rank0_decides(lambda: _fail_save(tmp, final, failures[0], needed))
    merged: Dict[str, Dict[str, Any]] = {}
    for part, _, _ in parts:
        merged.update(part)
    return merged


SMALL_FILES_BYTES = 64 << 10  # RNG state and metadata of one rank, about
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _fail_save(tmp: Path, final: Path, failure: Dict[str, Any], needed: int) -> NoReturn:
    """Rank 0: remove the incomplete copy now (it holds the space a full disk needs) and raise the
    CheckpointError that says why (``failure``: the write that failed; ``needed``: bytes, 0 unknown)."""
    shutil.rmtree(tmp, ignore_errors=True)
    root = final.parent
    latest = root / LATEST
    kept = (f"'{latest}' still names {latest.read_text().strip()}" if latest.is_file()
            else "no earlier checkpoint was affected")
    if failure["errno"] in DISK_FULL:
        try:
            free = _size(shutil.disk_usage(root).free)
        except OSError:
            free = "unknown"
        need = f"about {_size(needed)}" if needed else "more space"
        raise CheckpointError(f"disk full while saving checkpoint '{final}' (writing '{failure['path']}'): it needs "
                               f"{need}, {free} free in '{root}'; the incomplete copy was removed and {kept}. "
                               "Free space or set 'save' to another directory, then resume")
    raise CheckpointError(f"cannot write checkpoint file '{failure['path']}': {failure['strerror']}; the "
                          f"incomplete copy was removed and {kept}")


def publish(tmp: Path, root: Path, iteration: int) -> Path:
    """Rename the complete checkpoint ``tmp`` into place (replacing an older copy of the same step,
    never leaving the step missing) and point ``latest`` at it; directories fsynced around the renames."""
    final = root / step_dir_name(iteration)
    fsync_dir(tmp)
    if final.exists():
        old = root / f".old-{step_dir_name(iteration)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    latest = root / LATEST
    previous = latest.read_text().strip() if latest.is_file() else None
    try:
        atomic_write_text(latest, step_dir_name(iteration) + "\n")
    except OSError as e:  # the checkpoint is whole; only the pointer to it is not
        raise CheckpointError(
            f"checkpoint '{final}' is complete, but '{latest}' could not be updated to name it: "
            f"{e.strerror or e}; '{latest}' still names {previous or 'no checkpoint'}. Resume from this one with "
            f"load: '{final}', or fix '{root}' and resume as usual") from None
    fsync_dir(root)
    return final


def _make_tmp_dir(root: Path, iteration: int, session: Optional[SaveSession]) -> Path:
    """Rank 0 checks it still owns the directory and creates this run's temporary directory; every
    rank gets its path, or the same CheckpointError."""
    def make() -> str:
        try:
            if session is not None and session.lock is not None:
                session.lock.check_held()
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{step_dir_name(iteration)}-{socket.gethostname()}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of an interrupted save of this same process
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"cannot write into '{root}': {e}") from None
        return str(tmp)

    return Path(rank0_decides(make))


def prune_checkpoints(root: Path, keep_last: int, protect: Optional[int] = None) -> None:
    """Without a session: keep the highest ``keep_last`` step numbers, and always ``protect``."""
    for step in checkpoint_steps(root)[:-keep_last]:
        if step != protect:
            remove_checkpoint_dir(root / step_dir_name(step))


def resolve_checkpoint_dir(load: str) -> Path:
    """``load`` may be a save root (follows ``latest``) or a ``global_stepN`` directory."""
    path = Path(load)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        step = path / latest.read_text().strip()
        if (step / MANIFEST).is_file():
            return step
        raise CheckpointError(f"'{latest}' points to '{step}', which has no {MANIFEST}")
    if not path.exists():
        raise CheckpointError(f"checkpoint path '{load}' (key 'load') does not exist")
    raise CheckpointError(f"'{load}' (key 'load') holds no checkpoint: expected a '{LATEST}' file or "
                          f"a global_stepN directory with {MANIFEST}")


def checkpoint_at_step(load: str, iteration: int) -> str:
    """NeoX's ``iteration`` key: the ``global_stepN`` checkpoint under the save root ``load``."""
    path = Path(load) / step_dir_name(iteration)
    if not (path / MANIFEST).is_file():
        prefix = len(step_dir_name(0)) - 1
        steps = sorted(int(p.name[prefix:]) for p in Path(load).glob(step_dir_name(0)[:-1] + "*")
                       if p.name[prefix:].isdigit() and (p / MANIFEST).is_file())
        raise CheckpointError(f"iteration {iteration}: no checkpoint '{path}' (key 'load' is '{load}'); "
                              f"available iterations: {', '.join(map(str, steps)) or 'none'}")
    return str(path)


def read_manifest(ckpt_dir: Path) -> Dict[str, Any]:
    """The manifest, or one CheckpointError line (missing, not JSON, missing keys)."""
    return read_manifest_file(Path(ckpt_dir))


def load_checkpoint(load: str, model: torch.nn.Module, config_tree: Optional[Dict[str, Any]] = None
                    ) -> Dict[str, Any]:
    """Loads this rank's model shard into ``model``; returns the manifest (``iteration``, ``trainer``
    state, ...). The manifest and this shard's meta file are verified (their own checksums), then the
    shard (size and checksum); a shard that does not match the model is one line per tensor, with the
    model settings that differ from the checkpoint's (``config_tree``: this run's). The optimizer
    state and RNG come later, from :func:`load_optimizer_state` and :func:`restore_rng_state`, once
    the engine that owns the optimizer exists."""
    st = layout_of(model)
    ckpt = resolve_checkpoint_dir(load)
    manifest = read_manifest(ckpt)
    layout = manifest["layout"]
    if (layout["tp"], layout["pp"]) != (st.tp_size, st.pp_size):
        raise CheckpointError(
            f"checkpoint '{ckpt}' was saved with model_parallel_size={layout['tp']}, "
            f"pipe_parallel_size={layout['pp']} but this run uses {st.tp_size}, {st.pp_size}; "
            "re-shard it first with tools/ckpts/reshard.py")
    read_shard_meta(ckpt, st.tp_rank, st.pp_rank, manifest)  # verified on every load, not only when resharding
    model_file = ckpt / shard_name("model", st.tp_rank, st.pp_rank)
    if not model_file.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' is missing shard {model_file.name}")
    state = load_shard(model_file, True, manifest)
    problems = shape_problems(state, model.state_dict())
    if problems:
        changed = changed_model_settings(manifest.get("config") or {}, config_tree or {})
        raise CheckpointError(
            f"checkpoint '{model_file}' does not match the model ({len(problems)} tensor(s) differ"
            + (f"; model settings that differ from the checkpoint's: {changed}" if changed else "") + "):\n"
            + "\n".join(problems[:MAX_LISTED])
            + (f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""))
    model.load_state_dict(state)
    return manifest


MAX_LISTED = 20  # tensors named in a mismatch error; the rest are counted


def shape_problems(saved: Dict[str, Any], expected: Dict[str, Any]) -> list:
    """One line per tensor that differs: name, checkpoint shape, model shape (or missing on one side)."""
    lines = []
    for name, want in expected.items():
        have = saved.get(name)
        if have is None:
            lines.append(f"  {name}: not in the checkpoint, model {list(want.shape)}")
        elif tuple(have.shape) != tuple(want.shape):
            lines.append(f"  {name}: checkpoint {list(have.shape)}, model {list(want.shape)}")
    lines += [f"  {name}: checkpoint {list(saved[name].shape)}, not in the model" for name in saved
              if name not in expected]
    return lines


def changed_model_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> str:
    """``hidden_size 32 -> 64, ...``: model-section keys whose values differ between two config trees."""
    from dataclasses import fields

    from megatron.config.schema import ModelConfig

    keys = [f.name for f in fields(ModelConfig) if f.name in saved and f.name in current]
    return ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in keys if saved[k] != current[k])


def read_shard_meta(ckpt: Path, tp_rank: int, pp_rank: int,
                    manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    path = ckpt / f"meta_tp{tp_rank:02d}_pp{pp_rank:02d}.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' is missing {path.name}")
    return read_json_file(path, manifest if manifest is not None else read_manifest(ckpt))["params"]


def named_from_numbered(optim_sd: Dict[str, Any], meta: Dict[str, Dict[str, Any]], where: str) -> NamedState:
    """A format-1 optimizer shard (torch's numbered state dict) keyed by parameter name. Format 1
    numbered decayed (ndim >= 2) parameters first, then the rest, each in the order of the shard's
    meta file (``named_parameters`` order)."""
    names = ([n for n in meta if len(meta[n]["shape"]) >= 2] + [n for n in meta if len(meta[n]["shape"]) < 2])
    ids = [i for g in optim_sd["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise CheckpointError(f"{where}: optimizer holds {len(ids)} parameters but the model shard "
                              f"has {len(names)}; cannot map optimizer state to parameter names")
    by_id = dict(zip(ids, names))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[i] for i in g["params"]]}
              for g in optim_sd["param_groups"]]
    return {"param_groups": groups, "state": {by_id[i]: st for i, st in optim_sd["state"].items()}}


def read_optimizer_shard(ckpt: Path, tp_rank: int, pp_rank: int, manifest: Dict[str, Any]) -> NamedState:
    """One optimizer shard as a named state, whatever format version wrote it."""
    path = ckpt / shard_name("optim", tp_rank, pp_rank)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' is missing shard {path.name}")
    state = load_shard(path, False, manifest)
    if manifest.get("format_version", 1) < 2:
        state = named_from_numbered(state, read_shard_meta(ckpt, tp_rank, pp_rank, manifest), str(path))
    return state


def load_optimizer_state(load: str, layout: ParallelLayout) -> Optional[NamedState]:
    """This rank's named optimizer state from a checkpoint, or None when it was saved without one."""
    ckpt = resolve_checkpoint_dir(load)
    manifest = read_manifest(ckpt)
    if not manifest.get("has_optimizer"):
        return None
    return read_optimizer_shard(ckpt, layout.tp_rank, layout.pp_rank, manifest)


def restore_rng_state(load: str) -> None:
    """This global rank's RNG states as saved (absent when the world was smaller: left as they are)."""
    ckpt = resolve_checkpoint_dir(load)
    rng_file = ckpt / f"rng_rank{global_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(load_shard(rng_file, False, read_manifest(ckpt)))

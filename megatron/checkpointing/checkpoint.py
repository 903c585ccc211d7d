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

import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpointing.integrity import (
    atomic_write_text,
    fsync_dir,
    load_shard,
    read_json_file,
    read_manifest_file,
    write_shard,
    write_text,
)
from megatron.checkpointing.session import SaveSession, checkpoint_steps, remove_checkpoint_dir
from megatron.errors import CheckpointError
from megatron.parallel import ParallelLayout
from megatron.parallel.distributed import barrier, rank0_decides, world_size
from megatron.parallel.distributed import rank as global_rank

MANIFEST = "manifest.json"
LATEST = "latest"
# 2: optimizer shards keyed by parameter name (1: torch's numbered state dict, decayed params first).
FORMAT_VERSION = 2
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
    the highest step numbers (and always the one just written)."""
    st = layout_of(model)
    root = Path(save_dir)
    final = root / step_dir_name(iteration)
    tmp = _make_tmp_dir(root, iteration, session)
    files: Dict[str, Dict[str, Any]] = {}
    if st.dp_rank == 0 and st.cp_rank == 0:  # one writer per (tp, pp) shard; the rest are replicas
        files.update(write_shard(model.state_dict(), tmp / shard_name("model", st.tp_rank, st.pp_rank)))
        if optimizer_state is not None:
            files.update(write_shard(optimizer_state, tmp / shard_name("optim", st.tp_rank, st.pp_rank)))
        meta = {"params": shard_metadata(model)}
        files.update(write_text(tmp / f"meta_tp{st.tp_rank:02d}_pp{st.pp_rank:02d}.json", json.dumps(meta)))
    files.update(write_shard(rng_state(), tmp / f"rng_rank{global_rank():05d}.pt"))
    files = _gather_file_records(files)
    if global_rank() == 0:
        manifest = {
            "format_version": FORMAT_VERSION, "iteration": iteration,
            "layout": {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "cp": st.cp_size},
            "config": config_tree, "trainer": extra,
            "has_optimizer": optimizer_state is not None,
            "files": files,
        }
        if session is not None:
            manifest["lineage"] = {"parent": session.parent, "run": session.run_id}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
        if session is not None:
            session.before_publish()
        publish(tmp, root, iteration)
        if session is not None:
            session.after_publish(iteration, keep_last)
        elif keep_last:
            prune_checkpoints(root, keep_last, protect=iteration)
    elif session is not None:
        session.record(iteration)
    barrier()
    return final


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
    atomic_write_text(root / LATEST, step_dir_name(iteration) + "\n")
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


def _gather_file_records(files: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Every rank's file records, merged on rank 0 (after this, every rank has finished writing)."""
    if world_size() == 1:
        return files
    gathered = [None] * world_size() if global_rank() == 0 else None
    dist.gather_object(files, gathered, dst=0)
    merged: Dict[str, Dict[str, Any]] = {}
    for part in gathered or []:
        merged.update(part)
    return merged


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


def read_manifest(ckpt_dir: Path) -> Dict[str, Any]:
    """The manifest, or one CheckpointError line (missing, not JSON, missing keys)."""
    return read_manifest_file(Path(ckpt_dir))


def load_checkpoint(load: str, model: torch.nn.Module) -> Dict[str, Any]:
    """Loads this rank's model shard into ``model``; returns the manifest (``iteration``, ``trainer``
    state, ...). The optimizer state and RNG come later, from :func:`load_optimizer_state` and
    :func:`restore_rng_state`, once the engine that owns the optimizer exists."""
    st = layout_of(model)
    ckpt = resolve_checkpoint_dir(load)
    manifest = read_manifest(ckpt)
    layout = manifest["layout"]
    if (layout["tp"], layout["pp"]) != (st.tp_size, st.pp_size):
        raise CheckpointError(
            f"checkpoint '{ckpt}' was saved with model_parallel_size={layout['tp']}, "
            f"pipe_parallel_size={layout['pp']} but this run uses {st.tp_size}, {st.pp_size}; "
            "re-shard it first with tools/ckpts/reshard.py")
    model_file = ckpt / shard_name("model", st.tp_rank, st.pp_rank)
    if not model_file.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' is missing shard {model_file.name}")
    missing, unexpected = model.load_state_dict(load_shard(model_file, True, manifest), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{model_file}' does not match the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    return manifest


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

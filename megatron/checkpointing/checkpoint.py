"""Checkpoints: per-rank shards plus a manifest, written atomically.

Layout of ``SAVE/global_stepN/``::

    manifest.json          iteration, consumed samples, layout (tp, pp, dp), config, shard metadata
    model_tp00_pp00.pt     model state of tensor rank 0 / pipeline stage 0 (written by dp rank 0)
    optim_tp00_pp00.pt     optimizer state of that shard
    rng_rank00000.pt       RNG states of each global rank

Every rank writes into ``SAVE/.tmp-global_stepN``; after a barrier rank 0 renames it to its final
name and then atomically rewrites ``SAVE/latest``. A crash at any point leaves the previous
checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from megatron.parallel import get_state
from megatron.training.distributed import barrier, rank as global_rank

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A user-facing checkpoint problem (unwritable dir, missing or incompatible checkpoint)."""


def shard_name(kind: str, tp_rank: int, pp_rank: int) -> str:
    return f"{kind}_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def step_dir_name(iteration: int) -> str:
    return f"global_step{iteration}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(save_dir: str, iteration: int, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], extra: Dict[str, Any],
                    config_tree: Dict[str, Any], keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. ``extra`` holds trainer state (consumed samples, ...)."""
    st = get_state()
    root = Path(save_dir)
    final = root / step_dir_name(iteration)
    tmp = root / f".tmp-{step_dir_name(iteration)}"
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted save
        tmp.mkdir()
    barrier()
    if st.dp_rank == 0:
        torch.save(model.state_dict(), tmp / shard_name("model", st.tp_rank, st.pp_rank))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / shard_name("optim", st.tp_rank, st.pp_rank))
    torch.save(rng_state(), tmp / f"rng_rank{global_rank():05d}.pt")
    if global_rank() == 0:
        manifest = {
            "format_version": FORMAT_VERSION, "iteration": iteration,
            "layout": {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size},
            "config": config_tree, "trainer": extra,
            "has_optimizer": optimizer is not None,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
    if st.dp_rank == 0:
        meta = {"params": shard_metadata(model)}
        atomic_write_text(tmp / f"meta_tp{st.tp_rank:02d}_pp{st.pp_rank:02d}.json", json.dumps(meta))
    barrier()
    if global_rank() == 0:
        if final.exists():
            old = root / f".old-{step_dir_name(iteration)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(root / LATEST, step_dir_name(iteration) + "\n")
        if keep_last:
            prune_checkpoints(root, keep_last)
    barrier()
    return final


def prune_checkpoints(root: Path, keep_last: int) -> None:
    steps = sorted((int(p.name[len("global_step"):]), p) for p in root.glob("global_step*")
                   if p.name[len("global_step"):].isdigit())
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


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
    return json.loads((ckpt_dir / MANIFEST).read_text())


def load_checkpoint(load: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    weights_only: bool = False) -> Dict[str, Any]:
    """Loads this rank's shard. Returns the manifest (``iteration``, ``trainer`` state, ...)."""
    st = get_state()
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
    missing, unexpected = model.load_state_dict(torch.load(model_file, map_location="cpu",
                                                           weights_only=True), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{model_file}' does not match the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    if weights_only:
        return manifest
    if optimizer is not None and manifest.get("has_optimizer"):
        optimizer.load_state_dict(torch.load(ckpt / shard_name("optim", st.tp_rank, st.pp_rank),
                                             map_location="cpu", weights_only=False))
    rng_file = ckpt / f"rng_rank{global_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return manifest

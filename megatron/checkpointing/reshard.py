"""Merge a sharded checkpoint into one full state dict, and re-shard it for another TP x PP layout.
Data- and context-parallel sizes do not enter: parameters are replicated over those ranks, so any
dp x cp layout loads the shards of its tp x pp.

Merging: parameter names are global (layers are keyed by global index), so pipeline stages merge
by union; tensor-parallel shards concatenate along the ``tp_dim`` recorded in each
``meta_tpXX_ppYY.json``. Column-parallel shards (QKV included, thanks to its per-KV-group layout)
concatenate along dim 0 in rank order. With tied embeddings the last stage's ``lm_head.weight`` is a
synchronised copy of ``embed.weight`` and is dropped.

Re-sharding builds every target rank's model on the meta device from its layout (for its parameter
names, shapes and ``tp_dim``; no process groups), slices the full tensors, and re-shards the AdamW
state (``exp_avg``, ``exp_avg_sq``, ``step``, keyed by parameter name) the same way, so a run resumed
at the new layout continues as the old one would have.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron.checkpointing.checkpoint import (
    MANIFEST,
    NamedState,
    publish,
    read_manifest,
    read_optimizer_shard,
    read_shard_meta,
    resolve_checkpoint_dir,
    shard_metadata,
    shard_name,
    step_dir_name,
)
from megatron.checkpointing.integrity import (
    FORMAT_VERSION,
    atomic_write_text,
    file_digest,
    load_shard,
    signed_json,
    write_shard,
    write_signed_json,
)
from megatron.errors import CheckpointError
from megatron.progress import Progress

TIED_COPY = "lm_head.weight"
StateDict = Dict[str, torch.Tensor]


def _load(path: Path, manifest: Dict[str, Any]) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path.parent}' is missing shard {path.name}")
    return load_shard(path, True, manifest)  # size and checksum verified against the manifest


def is_tied(manifest: Dict[str, Any]) -> bool:
    return not manifest.get("config", {}).get("no_weight_tying", False)


def _merge_tp(tensors: List[torch.Tensor], tp_dim: Optional[int]) -> torch.Tensor:
    return tensors[0] if tp_dim is None or len(tensors) == 1 else torch.cat(tensors, dim=tp_dim)


def _merge_state_entries(entries: List[Dict[str, Any]], tp_dim: Optional[int]) -> Dict[str, Any]:
    out = {}
    for key, value in entries[0].items():
        if torch.is_tensor(value) and value.dim() > 0:
            out[key] = _merge_tp([e[key] for e in entries], tp_dim)
        else:
            out[key] = value  # scalar 'step': equal on every TP rank
    return out


def load_full_checkpoint(ckpt_dir: str, with_optimizer: bool = True
                         ) -> Tuple[StateDict, Dict[str, Dict[str, Any]], Dict[str, Any], List[dict]]:
    """(full model state, full optimizer state by parameter name, manifest, optimizer param groups:
    hyperparameters and the set of parameter names in each). Optimizer parts are empty when not
    saved or not asked for."""
    ckpt = resolve_checkpoint_dir(ckpt_dir)
    manifest = read_manifest(ckpt)
    tp, pp = manifest["layout"]["tp"], manifest["layout"]["pp"]
    with_optimizer = with_optimizer and bool(manifest.get("has_optimizer"))
    full: StateDict = {}
    full_optim: Dict[str, Dict[str, Any]] = {}
    groups: List[dict] = []
    tied = is_tied(manifest)
    for p in range(pp):
        metas = [read_shard_meta(ckpt, t, p, manifest) for t in range(tp)]
        shards = [_load(ckpt / shard_name("model", t, p), manifest) for t in range(tp)]
        optims = [read_optimizer_shard(ckpt, t, p, manifest) for t in range(tp)] if with_optimizer else []
        for shard_groups in (o["param_groups"] for o in optims):
            groups = groups or [dict(g, params=set()) for g in shard_groups]
            for group, shard_group in zip(groups, shard_groups):
                group["params"].update(_full_name(n, tied) for n in shard_group["params"])
        for name in shards[0]:
            if tied and name == TIED_COPY:
                continue
            tp_dim = metas[0].get(name, {}).get("tp_dim")
            if name in full:
                raise CheckpointError(f"checkpoint '{ckpt}': parameter {name} appears in two pipeline stages")
            full[name] = _merge_tp([s[name] for s in shards], tp_dim)
            if optims and name in optims[0]["state"]:
                _check_state_shapes(optims, name, metas, f"{ckpt}/{shard_name('optim', 0, p)}")
                full_optim[name] = _merge_state_entries([o["state"][name] for o in optims], tp_dim)
    return full, full_optim, manifest, groups


def _check_state_shapes(optims: List[NamedState], name: str, metas: List[Dict[str, Any]], where: str) -> None:
    for optim, meta in zip(optims, metas):
        for key, value in optim["state"][name].items():
            if torch.is_tensor(value) and value.dim() > 0 and list(value.shape) != meta[name]["shape"]:
                raise CheckpointError(f"{where}: optimizer state '{key}' of {name} has shape "
                                      f"{list(value.shape)}, parameter has {meta[name]['shape']}")


def load_full_state_dict(ckpt_dir: str) -> Tuple[StateDict, Dict[str, Any]]:
    """The unsharded model state dict (TP shards concatenated, PP stages merged) and the manifest."""
    full, _, manifest, _ = load_full_checkpoint(ckpt_dir, with_optimizer=False)
    return full, manifest


def _slice(t: torch.Tensor, tp_dim: Optional[int], tp_rank: int, tp: int) -> torch.Tensor:
    if tp_dim is None or tp == 1:
        return t.clone()
    if t.shape[tp_dim] % tp:
        raise CheckpointError(f"dimension {tp_dim} of size {t.shape[tp_dim]} is not divisible by tp {tp}")
    return t.chunk(tp, dim=tp_dim)[tp_rank].clone()


def _full_name(name: str, tied: bool) -> str:
    return "embed.weight" if tied and name == TIED_COPY else name


def build_stage_model(cfg, vocab_size: int, tp: int, pp: int, tp_rank: int, pp_rank: int, device: str = "meta"):
    """The model shard of (tp_rank, pp_rank) in a tp x pp layout, built without process groups; on the
    meta device by default (parameter names, shapes and ``tp_dim``; nothing allocated)."""
    from megatron.model import build_model
    from megatron.parallel import layout_for_rank

    layout = layout_for_rank(tp * pp, pp_rank * tp + tp_rank, tp=tp, pp=pp,
                             virtual_pipe_stages=cfg.parallel.virtual_pipe_stages)
    return build_model(cfg, vocab_size, (), None, layout=layout, device=device)


def check_output_dir(load: str, save: str, force: bool) -> None:
    """The re-shard tool writes into a new directory: never, without ``force``, into the save root of
    the checkpoint it reads (that replaces the original step in place) nor a non-empty directory."""
    src = resolve_checkpoint_dir(load).resolve()
    out = Path(save).resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--save '{save}' exists and is not a directory")
    if force:
        return
    if out in (src, src.parent) or src in out.parents:
        raise CheckpointError(f"--save '{save}' holds the checkpoint being re-sharded ('{src}'), which would be "
                              "replaced in place; write to a new directory, or pass --force to replace it")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--save directory '{save}' is not empty; pass --force to write into it")


def save_resharded(ckpt_dir: str, out_dir: str, tp: int, pp: int, weights_only: bool = False,
                   progress: bool = False) -> Path:
    """Write ``out_dir/global_stepN`` (and ``out_dir/latest``) for layout ``tp`` x ``pp``.

    Model and AdamW state are re-sharded; ``weights_only=True`` (or a source saved without
    optimizer) writes weights only, and the manifest's ``has_optimizer`` says so. Returns the step dir.
    ``progress``: report the bytes read and written on stderr (megatron/progress.py).
    """
    from megatron.config import config_from_tree, validate_model_split

    source = resolve_checkpoint_dir(ckpt_dir)
    read = sum(f.stat().st_size for f in source.glob("*_tp*_pp*.pt") if not weights_only or f.name.startswith("model"))
    # Writing takes about what reading does: the ETA counts the input bytes twice.
    bar = Progress("resharding", total=2 * read, unit="B", enabled=progress)
    full, full_optim, manifest, groups = load_full_checkpoint(ckpt_dir, with_optimizer=not weights_only)
    bar.set(read)
    tree = dict(manifest["config"], model_parallel_size=tp, pipe_parallel_size=pp)
    cfg = config_from_tree(tree, log=lambda *_: None)
    validate_model_split(cfg, tp, pp, cfg.parallel.virtual_pipe_stages)
    tied = is_tied(manifest)
    vocab_size = full["embed.weight"].shape[0]
    root = Path(out_dir)
    iteration = manifest["iteration"]
    tmp = root / f".tmp-{step_dir_name(iteration)}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    used = set()
    files: Dict[str, Dict[str, Any]] = {}
    for p in range(pp):
        for t in range(tp):
            model = build_stage_model(cfg, vocab_size, tp, pp, t, p)
            meta = shard_metadata(model)
            shard = {}
            for name, ref in model.named_parameters():
                src = _full_name(name, tied)
                if src not in full:
                    raise CheckpointError(f"source checkpoint has no parameter {src} needed by tp {t} pp {p}")
                value = _slice(full[src], meta.get(name, {}).get("tp_dim"), t, tp)
                if value.shape != ref.shape:
                    raise CheckpointError(f"{name}: re-sharded shape {tuple(value.shape)} != model's "
                                          f"{tuple(ref.shape)} at tp {t} pp {p}")
                shard[name] = value
                used.add(src)
            files.update(write_shard(shard, tmp / shard_name("model", t, p)))
            bar.update(sum(v.numel() * v.element_size() for v in shard.values()))
            files.update(write_signed_json(tmp / f"meta_tp{t:02d}_pp{p:02d}.json", {"params": meta}))
            if full_optim:
                optim = _reshard_optimizer(meta, full_optim, groups, tied, t, tp)
                files.update(write_shard(optim, tmp / shard_name("optim", t, p)))
                bar.update(sum(v.numel() * v.element_size() for v in _tensors(optim)))
    unused = set(full) - used
    if unused:
        raise CheckpointError(f"parameters not placed in any target shard: {sorted(unused)[:5]}")
    src_ckpt = resolve_checkpoint_dir(ckpt_dir)
    old = manifest["layout"]
    old_world = old["tp"] * old["pp"] * old.get("dp", 1) * old.get("cp", 1)
    for r in range(min(old_world, tp * pp)):
        rng = src_ckpt / f"rng_rank{r:05d}.pt"
        if rng.is_file():
            shutil.copy(rng, tmp / rng.name)
            files.update(file_digest(tmp / rng.name))
    new_manifest = dict(manifest, config=tree, has_optimizer=bool(full_optim), format_version=FORMAT_VERSION,
                        files=files,
                        layout={"tp": tp, "pp": pp, "dp": 1, "cp": 1},
                        resharded_from={"path": str(src_ckpt), "layout": manifest["layout"]})
    atomic_write_text(tmp / MANIFEST, signed_json(new_manifest, indent=1))
    bar.set(bar.total)
    bar.close()
    return publish(tmp, root, iteration)


def _tensors(tree: Any):
    """Every tensor in a nested dict / list (an optimizer shard)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _reshard_optimizer(meta: Dict[str, Dict[str, Any]], full_optim: Dict[str, Dict[str, Any]],
                       groups: List[dict], tied: bool, tp_rank: int, tp: int) -> NamedState:
    """The named optimizer state of one target shard (parameters in ``meta``): each parameter's full
    state sliced like the parameter, each group with the hyperparameters it had when saved."""
    state = {}
    for name in meta:
        src = full_optim.get(_full_name(name, tied))
        if src is None:
            continue
        tp_dim = meta[name]["tp_dim"]
        state[name] = {k: (_slice(v, tp_dim, tp_rank, tp) if torch.is_tensor(v) and v.dim() > 0
                           else (v.clone() if torch.is_tensor(v) else v)) for k, v in src.items()}
    out_groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [n for n in meta if _full_name(n, tied) in g["params"]]} for g in groups]
    return {"param_groups": out_groups, "state": state}

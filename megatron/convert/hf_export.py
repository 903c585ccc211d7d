"""Our checkpoint (any TP/PP layout, merged on the fly) -> an HF model directory.

Writes config.json (with the SepLLM settings as an extra "sepllm" key, for streaming and
training-free inference), model.safetensors, generation_config.json and the tokenizer files. A model
trained with a Sep-Attention rule also gets the modeling code that makes transformers compute that
rule (``auto_map``, see ``megatron/convert/remote_code.py``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron.checkpointing.checkpoint import read_manifest, resolve_checkpoint_dir
from megatron.checkpointing.reshard import load_full_state_dict
from megatron.config import Config, config_from_tree
from megatron.convert.common import DTYPES, TensorSource, prepare_output_dir, write_json, write_safetensors
from megatron.convert.families import family_for_model
from megatron.convert.remote_code import auto_map, cache_settings, needs_remote_code, write_remote_code
from megatron.convert.tokenizer_files import (
    copy_tokenizer_files,
    project_tokenizer,
    resolved_separator_ids,
    special_token_ids,
    tokenizer_vocab_size,
)
from megatron.errors import CheckpointError, ConfigError, ConversionError

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportResult:
    output_dir: Path
    architecture: str
    vocab_size: int
    files: Tuple[str, ...]


def load_merged_state(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """The unsplit model state dict of a checkpoint, whatever TP/PP layout it was saved with."""
    try:
        state, _ = load_full_state_dict(str(ckpt_dir))
    except (CheckpointError, KeyError, json.JSONDecodeError) as e:
        raise ConversionError(f"checkpoint '{ckpt_dir}' could not be merged: {e}") from None
    return state


def sepllm_settings(cfg: Config, cache: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What streaming / training-free inference needs to reproduce the training-time attention, and
    the cache budget ``generate`` uses by default."""
    settings = dataclasses.asdict(cfg.attention.sepllm)
    settings["layer_n_local"] = {str(k): v for k, v in settings["layer_n_local"].items()}  # JSON keys
    settings["separator_ids"] = resolved_separator_ids(cfg)
    settings["attention_impl"] = cfg.attention.impl
    tokenizer = project_tokenizer(cfg.data)
    settings["eod_id"] = int(tokenizer.eod_id) if tokenizer is not None else None
    settings["cache"] = cache_settings(cfg, cache) if needs_remote_code(cfg) else None
    if needs_remote_code(cfg):
        if settings["mode"] == "sepllm" and settings["separator_ids"] is None:
            raise ConversionError("the separator ids are unknown: the tokenizer of data.vocab_file is not readable; "
                                  "set attention.sepllm.separator_ids or point vocab_file at the tokenizer")
        if settings["separate_documents"] and settings["eod_id"] is None:
            raise ConversionError("attention.sepllm.separate_documents needs the tokenizer's end-of-document id, but "
                                  "the tokenizer of data.vocab_file is not readable")
    return settings


def real_vocab_size(requested: Optional[int], manifest: Dict[str, Any], cfg: Config, padded: int,
                    log: Callable[[str], None]) -> int:
    """The unpadded vocab: --vocab-size, else the import record, else the tokenizer, else padded."""
    source = (manifest.get("trainer") or {}).get("source") or {}
    for value, what in ((requested, "--vocab-size"), (source.get("vocab_size"), "the import record"),
                        (tokenizer_vocab_size(cfg.data), f"the tokenizer '{cfg.data.vocab_file}'")):
        if value is not None:
            if not 0 < int(value) <= padded:
                raise ConversionError(f"vocab size {value} from {what} does not fit the checkpoint's "
                                      f"{padded} embedding rows")
            return int(value)
    log(f"warning: no tokenizer found; exporting all {padded} (padded) vocab rows; pass --vocab-size")
    return padded


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConversionError(f"output directory '{out}' is not empty; pass --force to overwrite")


def check_finite(state: Dict[str, torch.Tensor], ckpt_dir: Path, allow: bool, log: Callable[[str], None]) -> None:
    """A diverged model (NaN/inf weights) is refused unless ``allow`` (then a warning)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    what = f"{len(bad)} tensor(s) with NaN/inf values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
    if not allow:
        raise ConversionError(f"checkpoint '{ckpt_dir}' has {what}: the run diverged; export an earlier "
                              "checkpoint, or pass --allow-non-finite to export it anyway")
    log(f"warning: exporting {what} (--allow-non-finite)")


def export_hf(checkpoint: str, output_dir: str, force: bool = False, vocab_size: Optional[int] = None,
              dtype: str = "auto", tokenizer_dir: Optional[str] = None, progress: bool = True,
              log: Callable[[str], None] = print, architecture: Optional[str] = None,
              cache: Optional[Dict[str, Any]] = None, allow_non_finite: bool = False,
              save_tokenizer: bool = True) -> ExportResult:
    """Write ``checkpoint`` as an HF model directory. ``architecture`` (an HF class or model_type)
    overrides the choice made from the model's shape (and, for imported models, the import record);
    ``cache`` overrides the default Streaming-SepLLM budget (CacheConfig fields) stored for generate;
    non-finite weights (a diverged run) are refused unless ``allow_non_finite``; ``save_tokenizer=False``
    writes no tokenizer files."""
    out = Path(output_dir)
    check_output_dir(out, force)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; expected auto or one of {', '.join(DTYPES)}")
    try:
        ckpt_dir = resolve_checkpoint_dir(checkpoint)
    except CheckpointError as e:
        raise ConversionError(str(e).replace(" (key 'load')", "")) from None
    manifest = read_manifest(ckpt_dir)
    try:
        cfg = config_from_tree(manifest["config"])
    except (ConfigError, KeyError) as e:
        raise ConversionError(f"'{ckpt_dir}/manifest.json' holds no valid config: {e}") from None
    recorded = ((manifest.get("trainer") or {}).get("source") or {}).get("architecture")
    family = family_for_model(cfg, architecture or recorded)
    family.check_exportable(cfg)
    sepllm = sepllm_settings(cfg, cache)  # its errors depend on the config only: before reading the weights

    state = load_merged_state(ckpt_dir)
    check_finite(state, ckpt_dir, allow_non_finite, log)
    if "embed.weight" not in state:
        raise ConversionError(f"checkpoint '{ckpt_dir}' has no 'embed.weight'")
    family = family.for_export(cfg, state)
    padded = state["embed.weight"].shape[0]
    if not cfg.model.no_weight_tying:
        state.pop("lm_head.weight", None)  # the last pipeline stage's copy of the tied embedding
    vocab = real_vocab_size(vocab_size, manifest, cfg, padded, log)
    if dtype != "auto":
        state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in state.items()}
    source = TensorSource(state, origin=f"checkpoint '{ckpt_dir}'",
                          shape_hint=f"the config in '{ckpt_dir / 'manifest.json'}'")
    hf_state = family.to_hf(source, cfg, vocab, padded, progress=progress)

    tok_src = Path(tokenizer_dir) if tokenizer_dir else (
        Path(cfg.data.vocab_file).parent if cfg.data.vocab_file else None)
    if not save_tokenizer:
        tok_src = None
    if tok_src is not None and not tok_src.is_dir():
        log(f"warning: tokenizer directory '{tok_src}' not found; no tokenizer files exported")
        tok_src = None
    special = special_token_ids(tok_src) if tok_src else {}
    weight_dtype = next(iter(hf_state.values())).dtype
    config = {**family.hf_config(cfg, vocab), **special,
              "torch_dtype": TORCH_DTYPE_NAMES.get(weight_dtype, "float32"), "sepllm": sepllm}
    if needs_remote_code(cfg):
        config["auto_map"] = auto_map(family.architecture)

    prepare_output_dir(out, force)
    write_safetensors(hf_state, out / "model.safetensors")
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"_from_model_config": True, **special})
    files = ["config.json", "model.safetensors", "generation_config.json"]
    if needs_remote_code(cfg):
        files += write_remote_code(out)
    if tok_src is not None:
        files += copy_tokenizer_files(tok_src, out)
    log(f"exported {family.architecture} ({cfg.model.num_layers} layers, vocab {vocab}) from {ckpt_dir} "
        f"to {out}: {', '.join(files)}")
    return ExportResult(out, family.architecture, vocab, tuple(files))

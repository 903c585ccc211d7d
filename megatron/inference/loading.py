"""Checkpoint and tokenizer loading for inference (unsharded model on one device)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.checkpointing import read_manifest, resolve_checkpoint_dir
from megatron.checkpointing.reshard import load_full_state_dict
from megatron.config import config_from_tree
from megatron.config.schema import Config
from megatron.errors import CheckpointError, ConfigError, InferenceError
from megatron.model.attention_plan import resolve_attention_plan
from megatron.model.gpt import GPTModel, build_model


def _full_state_dict(ckpt: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_full_state_dict(str(ckpt))[0]
    except (CheckpointError, OSError, RuntimeError, KeyError) as err:
        raise InferenceError(f"cannot read checkpoint '{ckpt}': {err}") from None


def separator_ids_for(cfg: Config, tokenizer=None) -> List[int]:
    """The separator ids of the model's attention plan ([] when neither the config nor a tokenizer gives them)."""
    return resolve_attention_plan(cfg.model, cfg.attention.sepllm, tokenizer).separator_list


def load_model(load: str, tokenizer=None, device: str = "cpu",
               separator_ids: Optional[Sequence[int]] = None) -> Tuple[GPTModel, Config, Path]:
    """(model in eval mode, its config, the resolved global_stepN directory) from a checkpoint."""
    try:
        ckpt = resolve_checkpoint_dir(load)
        manifest = read_manifest(ckpt)
    except (CheckpointError, OSError, ValueError) as err:
        raise InferenceError(f"unknown checkpoint: {err}") from None
    try:
        cfg = config_from_tree(manifest["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise InferenceError(f"checkpoint '{ckpt}' has no usable config: {err}") from None
    state = _full_state_dict(ckpt)
    if "embed.weight" not in state:
        raise InferenceError(f"checkpoint '{ckpt}' has no embed.weight; is it a full model checkpoint?")
    plan = resolve_attention_plan(cfg.model, cfg.attention.sepllm, tokenizer, separator_ids)
    eod = getattr(tokenizer, "eod_id", None) if tokenizer is not None else None
    if cfg.attention.sepllm.separate_documents and eod is None:
        raise InferenceError("this model separates documents and needs the tokenizer's EOD id; give a tokenizer")
    model = build_model(cfg, state["embed.weight"].shape[0], plan, eod)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceError(f"checkpoint '{ckpt}' does not match its config: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    return model.to(device).eval(), cfg, ckpt


def tokenizer_candidates(ckpt: Path, cfg: Config) -> List[Tuple[str, str, Optional[str]]]:
    """(type, vocab_file, merge_file) guesses: the config's data keys, then a tokenizer/ folder
    next to the checkpoint (where HF import puts it)."""
    found = []
    d = cfg.data
    if d.vocab_file and Path(d.vocab_file).is_file():
        found.append((d.tokenizer_type, d.vocab_file, d.merge_file))
    for folder in (ckpt / "tokenizer", ckpt.parent / "tokenizer"):
        if (folder / "tokenizer.json").is_file():
            found.append(("HFTokenizer", str(folder / "tokenizer.json"), None))
        elif (folder / "tokenizer.model").is_file():
            found.append(("SPMTokenizer", str(folder / "tokenizer.model"), None))
    return found


def load_tokenizer(load: str, tokenizer_type: Optional[str] = None, vocab_file: Optional[str] = None,
                   merge_file: Optional[str] = None):
    """The tokenizer given on the command line, else the one the checkpoint's config names."""
    from megatron.tokenizer import build_tokenizer

    choices: List[Tuple[str, str, Optional[str]]] = []
    if vocab_file:
        if not Path(vocab_file).is_file():
            raise InferenceError(f"tokenizer file '{vocab_file}' not found")
        choices.append((tokenizer_type or ("SPMTokenizer" if vocab_file.endswith(".model") else "HFTokenizer"),
                        vocab_file, merge_file))
    else:
        try:
            ckpt = resolve_checkpoint_dir(load)
            cfg = config_from_tree(read_manifest(ckpt)["config"])
        except (CheckpointError, ConfigError, OSError, KeyError, ValueError) as err:
            raise InferenceError(f"unknown checkpoint: {err}") from None
        choices = tokenizer_candidates(ckpt, cfg)
        if not choices:
            raise InferenceError(f"no tokenizer found for checkpoint '{ckpt}'; pass --vocab-file")
    kind, vocab, merges = choices[0]
    try:
        return build_tokenizer(kind, vocab, merges)
    except Exception as err:  # the tokenizer module raises its own error types
        raise InferenceError(f"cannot load tokenizer '{vocab}': {err}") from None

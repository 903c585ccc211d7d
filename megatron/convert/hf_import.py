"""HF checkpoint directory (or a GGUF file) -> our checkpoint (iteration 0, weights only) + a matching YAML.

The SepLLM post-training path: take a full-attention model and continue training it with
Sep-Attention (see configs/finetune_example.yml).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from megatron.checkpointing import save_checkpoint
from megatron.config import Config, SepLLMConfig, config_from_tree, config_to_tree, validate_layout
from megatron.convert.common import DTYPES, TensorSource, read_hf_weights, read_json
from megatron.convert.families import GPT2Family, family_from_hf_config, strip_gpt2_prefix
from megatron.convert.gguf import gguf_to_hf, is_gguf
from megatron.convert.tokenizer_files import copy_tokenizer_files, tokenizer_data_keys, tokenizer_vocab_size
from megatron.errors import CheckpointError, ConfigError, ConversionError
from megatron.model import GPTModel, build_model
from megatron.tokenizer import padded_vocab_size


@dataclass
class ImportResult:
    checkpoint_dir: Path  # the save root (holds ``latest``)
    config_path: Path
    architecture: str
    vocab_size: int
    padded_vocab_size: int


SEPLLM_RULE_KEYS = tuple(f.name for f in fields(SepLLMConfig))  # what the export writes (dataclasses.asdict)


def imported_attention(hf: Dict[str, Any]) -> Dict[str, Any]:
    """The attention section of the imported config: the Sep-Attention rule our export wrote under
    config.json 'sepllm' (so import -> export -> import keeps the method), else plain causal
    attention, which is what any other HF model was trained with (a fine-tune overlay switches
    Sep-Attention on)."""
    sep = hf.get("sepllm")
    if not isinstance(sep, dict) or sep.get("mode", "full") == "full":
        return {"sepllm": {"mode": "full"}}
    rule = {k: sep[k] for k in SEPLLM_RULE_KEYS if sep.get(k) is not None}
    if isinstance(rule.get("layer_n_local"), dict):
        rule["layer_n_local"] = {int(k): v for k, v in rule["layer_n_local"].items()}
    return {"sepllm": rule}


def build_config_tree(model_keys: Dict[str, Any], seq_length: Optional[int], divisible_by: int, tp: int,
                      pp: int, data_keys: Dict[str, str],
                      attention: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    max_pos = model_keys["max_position_embeddings"]
    seq = seq_length or max_pos  # the model's context, as GPT-NeoX configs set it; train shorter with --seq-length
    if model_keys.get("pos_emb") == "learned" and seq > max_pos:
        raise ConversionError(f"--seq-length {seq} exceeds the model's {max_pos} learned positions")
    return {**model_keys, "seq_length": seq, "make_vocab_size_divisible_by": divisible_by,
            "model_parallel_size": tp, "pipe_parallel_size": pp, **data_keys,
            "attention": attention or {"sepllm": {"mode": "full"}}}


def checked_config(tree: Dict[str, Any], tp: int, pp: int) -> Config:
    try:
        cfg = config_from_tree(tree)
        validate_layout(cfg, tp * pp)
    except ConfigError as e:
        raise ConversionError(f"the imported model does not fit our config: {e}") from None
    return cfg


def model_with_weights(cfg: Config, padded_vocab: int, weights: Dict[str, torch.Tensor]) -> GPTModel:
    """An unsplit GPTModel holding ``weights`` (built on the meta device: no random init cost)."""
    model = build_model(cfg, padded_vocab, device="meta")
    tp_dims = {n: getattr(p, "tensor_parallel_dim", None) for n, p in model.named_parameters()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:  # the family tables and GPTModel disagree: a bug, not a user error
        raise ConversionError(f"converted weights do not fit GPTModel: {str(e).splitlines()[0]}") from None
    for name, param in model.named_parameters():
        if tp_dims[name] is not None:
            param.tensor_parallel_dim = tp_dims[name]  # assign=True drops the attribute; reshard needs it
    return model


def write_checkpoint(model: GPTModel, cfg: Config, save_dir: Path, tp: int, pp: int,
                     extra: Dict[str, Any], log: Callable[[str], None]) -> None:
    tree = config_to_tree(cfg)
    if tp == 1 and pp == 1:
        save_checkpoint(str(save_dir), 0, model, None, extra, tree)
        return
    from megatron.checkpointing.reshard import save_resharded

    # Writing every rank's shard needs the reshard code path; go through an unsplit checkpoint.
    with tempfile.TemporaryDirectory(prefix=".hf-import-", dir=save_dir) as tmp:
        tp1_tree = {**tree, "model_parallel_size": 1, "pipe_parallel_size": 1}
        save_checkpoint(tmp, 0, model, None, extra, tp1_tree)
        log(f"splitting for tp={tp} pp={pp}")
        try:
            save_resharded(tmp, str(save_dir), tp, pp, weights_only=True)
        except CheckpointError as e:
            raise ConversionError(f"could not split the checkpoint for tp={tp} pp={pp}: {e}") from None


def write_yaml(path: Path, tree: Dict[str, Any], hf_dir: Path, architecture: str) -> None:
    header = (f"# Model of {architecture} imported from {hf_dir} by tools/ckpts/convert_from_hf.py.\n"
              "# Combine with a fine-tune overlay, e.g.\n"
              f"#   python deepy.py train.py {path} configs/finetune_example.yml\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False))


def import_hf(hf_dir: str, save_dir: str, config_out: Optional[str] = None, tp: int = 1, pp: int = 1,
              seq_length: Optional[int] = None, divisible_by: int = 128, dtype: str = "fp32",
              force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> ImportResult:
    """Import the HF model directory ``hf_dir``, or a ``.gguf`` file (dequantized through transformers
    into a temporary HF directory first)."""
    src_dir, save = Path(hf_dir), Path(save_dir)
    if save.exists() and any(save.iterdir()) and not force:
        raise ConversionError(f"save directory '{save}' is not empty; pass --force to overwrite")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    args = (config_out, tp, pp, seq_length, divisible_by, dtype, progress, log)
    if is_gguf(hf_dir) and not src_dir.is_dir():
        if not src_dir.is_file():
            raise ConversionError(f"GGUF file '{hf_dir}' not found")
        save.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=save) as tmp:
            converted = gguf_to_hf(hf_dir, str(Path(tmp) / "hf"), dtype, log)
            return import_dir(converted, save, *args, origin=src_dir)
    if not src_dir.is_dir():
        raise ConversionError(f"HF model directory '{hf_dir}' does not exist")
    return import_dir(src_dir, save, *args, origin=src_dir)


def import_dir(src_dir: Path, save: Path, config_out: Optional[str], tp: int, pp: int, seq_length: Optional[int],
               divisible_by: int, dtype: str, progress: bool, log: Callable[[str], None],
               origin: Path) -> ImportResult:
    """``import_hf`` of an HF directory; ``origin`` is what the user named (recorded in the checkpoint)."""
    hf = read_json(src_dir / "config.json")
    family = family_from_hf_config(hf)
    tok_dir = save / "tokenizer"
    data_keys = tokenizer_data_keys(src_dir, tok_dir.resolve())
    tree = build_config_tree(family.model_keys(hf), seq_length, divisible_by, tp, pp, data_keys,
                             imported_attention(hf))
    cfg = checked_config(tree, tp, pp)  # fail on config problems before reading gigabytes of weights
    vocab_size = int(hf["vocab_size"])
    padded = padded_vocab_size(vocab_size, divisible_by, tp)

    tensors = read_hf_weights(src_dir)
    if isinstance(family, GPT2Family):
        tensors = strip_gpt2_prefix(tensors)
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in tensors.items()}
    hint = str(src_dir / "config.json") if src_dir == origin else f"the model config of '{origin}'"
    source = TensorSource(tensors, origin=str(origin), shape_hint=hint, ignorable=family.ignorable)
    weights = family.to_ours(source, cfg, vocab_size, padded, progress=progress)
    del tensors, source

    save.mkdir(parents=True, exist_ok=True)
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    copy_tokenizer_files(src_dir, tok_dir)
    if not data_keys:
        log(f"warning: no tokenizer files in '{src_dir}'; set vocab_file in the YAML before training")
    tok_vocab = tokenizer_vocab_size(cfg.data) if data_keys else None
    if tok_vocab is not None and padded_vocab_size(tok_vocab, divisible_by, tp) != padded:
        log(f"warning: the tokenizer has {tok_vocab} tokens, which pads to "
            f"{padded_vocab_size(tok_vocab, divisible_by, tp)} rows, but the model's vocab_size {vocab_size} "
            f"pads to {padded}; training would build a different embedding size. Pick "
            "--make-vocab-size-divisible-by so both pad to the same size.")

    model = model_with_weights(cfg, padded, weights)
    extra = {"consumed_samples": 0,
             "source": {"hf_dir": str(origin.resolve()), "architecture": family.architecture,
                        "vocab_size": vocab_size}}
    write_checkpoint(model, cfg, save, tp, pp, extra, log)
    config_path = Path(config_out) if config_out else save / "model.yml"
    write_yaml(config_path, tree, origin, family.architecture)
    log(f"imported {family.architecture} from {origin}: {cfg.model.num_layers} layers, hidden "
        f"{cfg.model.hidden_size}, vocab {vocab_size} (padded {padded}), seq_length {cfg.model.seq_length} "
        f"-> {save} (tp={tp} pp={pp}); config {config_path}")
    return ImportResult(save, config_path, family.architecture, vocab_size, padded)

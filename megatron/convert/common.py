"""Pieces shared by the HF import and export: checked tensor access, QKV layouts, file I/O."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from megatron.errors import ConversionError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"'{path}' not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"'{path}' is not valid JSON (line {e.lineno}): {e.msg}") from None


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


class TensorSource:
    """A name -> tensor mapping that is consumed by ``take``; each access checks presence and shape.

    ``origin`` names where the tensors came from, and ``shape_hint`` what the expected shapes were
    derived from, so every error says which tensor of which file disagrees with which config.
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], origin: str, shape_hint: str,
                 ignorable: Sequence[str] = ()):
        self.tensors = dict(tensors)
        self.origin, self.shape_hint = origin, shape_hint
        self.ignorable = tuple(ignorable)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        if name not in self.tensors:
            raise ConversionError(f"{self.origin}: tensor '{name}' is missing (expected shape "
                                  f"{shape_str(shape)} from {self.shape_hint})")
        t = self.tensors.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.origin}: tensor '{name}' has shape {shape_str(t.shape)} but "
                                  f"{self.shape_hint} implies {shape_str(shape)}")
        return t

    def peek(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """Like ``take`` but the tensor stays (for an HF tensor that two of ours are copies of)."""
        tensor = self.take(name, shape)
        self.tensors[name] = tensor
        return tensor

    def discard(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors.pop(name, None)

    def check_consumed(self) -> None:
        """Raise if tensors nobody asked for are left (other than known buffers such as inv_freq)."""
        left = sorted(n for n in self.tensors if not any(n.endswith(s) for s in self.ignorable))
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise ConversionError(f"{self.origin}: unexpected tensors {left[:5]}{more}; they do not belong "
                                  f"to the architecture described by {self.shape_hint}")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Separate q [Hq*d, ...], k, v [Hkv*d, ...] -> our fused rows [q_1..q_r, k, v] per KV group."""
    group = num_heads // num_kv_heads
    rest = q.shape[1:]
    d = q.shape[0] // num_heads
    parts = (q.reshape(num_kv_heads, group, d, *rest), k.reshape(num_kv_heads, 1, d, *rest),
             v.reshape(num_kv_heads, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int,
              num_kv_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    group = num_heads // num_kv_heads
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    y = qkv.reshape(num_kv_heads, group + 2, d, *rest)
    return (y[:, :group].reshape(num_heads * d, *rest), y[:, group].reshape(num_kv_heads * d, *rest),
            y[:, group + 1].reshape(num_kv_heads * d, *rest))


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad an embedding/head [V, H] with zero rows up to ``rows`` (the padded vocab size)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# --------------------------------------------------------------------------- HF weight files
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _load_one(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"weight file '{path}' is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # corrupt or truncated files surface here with library-specific types
        raise ConversionError(f"weight file '{path}' could not be read: {str(e).splitlines()[0]}") from None


def read_hf_weights(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint: single-file or sharded (index json), safetensors or .bin."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"'{index}' has no 'weight_map'")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (hf_dir / s).is_file()]
            if missing:
                raise ConversionError(f"'{index}' lists shard(s) that are missing from '{hf_dir}': "
                                      f"{', '.join(missing)}")
            tensors: Dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(_load_one(hf_dir / shard))
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise ConversionError(f"'{index}' maps {absent[:3]} to shards that do not contain them")
            return tensors
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return _load_one(hf_dir / name)
    raise ConversionError(f"'{hf_dir}' holds no weights: expected one of {', '.join(HF_WEIGHT_FILES)}")


def write_safetensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    # safetensors refuses views that share storage; every tensor gets its own contiguous copy.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def prepare_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConversionError(f"output directory '{out}' is not empty; pass --force to overwrite")
        # Stale weight shards from an earlier export would be picked up next to the new ones.
        for pattern in ("model*.safetensors", "pytorch_model*.bin", "*.index.json"):
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

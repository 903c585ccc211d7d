"""GPT pretraining samples of ``seq_length + 1`` tokens read across document boundaries (Megatron semantics).

Three index arrays describe a dataset, built once and cached as ``.npy``:
  * ``doc_idx``: the split's documents repeated for enough epochs, shuffled (the last epoch separately
    when it is used for less than 80% of its samples, so a partial last epoch does not skew the mix);
  * ``sample_idx`` [num_samples + 1, 2]: where sample ``i`` starts, as (position in doc_idx, token
    offset); consecutive samples share one token, so sample ``i`` covers stream positions
    ``[i * seq_length, (i + 1) * seq_length]``;
  * ``shuffle_idx``: a permutation of the samples (again keeping a separate last epoch apart).
Everything derives from one ``numpy.random.RandomState(seed)``, so the order is a function of the seed.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron.errors import DataError
from megatron.data.indexed_dataset import MMapIndexedDataset

INDEX_CACHE_VERSION = 1
LAST_EPOCH_SEPARATE_BELOW = 0.80


def parse_split(split: str) -> List[float]:
    """``"969,30,1"`` (or ``/``-separated) -> three normalized weights for train, valid, test."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split '{split}' must be comma-separated numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"split '{split}' must be 1 to 3 non-negative weights with a positive sum, "
                        "like '969,30,1'")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_boundaries(split: str, num_documents: int) -> List[int]:
    """Document boundaries [0, train_end, valid_end, num_documents]: each split gets round(weight * n)
    documents and any rounding surplus or deficit is taken off (or given to) every boundary after the
    first, so the last one is exactly ``num_documents``."""
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    clipped, prev = [], 0
    for b in bounds:
        prev = min(max(b, prev), num_documents)
        clipped.append(prev)
    clipped[-1] = num_documents
    return clipped


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream yields ``num_samples`` samples (each needs seq_length new tokens
    plus the one shared with the next sample)."""
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(documents.astype(np.int64), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate([first, last])


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Row i = (position in doc_idx, offset) of stream token ``i * seq_length``."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    starts = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(sizes[doc_idx].astype(np.int64), out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: the token lives in the last document starting at or before it.
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = doc_pos
    sample_idx[:, 1] = positions - starts[doc_pos]
    return sample_idx


def build_shuffle_idx(num_samples: int, total_samples: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, total); the first ``num_samples`` and the rest are shuffled separately."""
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total_samples:
        return first
    rest = np.arange(num_samples, total_samples, dtype=np.int64)
    rng.shuffle(rest)
    return np.concatenate([first, rest])


def _dist():
    if "torch" not in sys.modules:  # nothing can have initialized torch.distributed; skip the slow import
        return None
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


class GPTDataset:
    """``ds[i] == {"text": int64 array of seq_length + 1}``; ``len(ds)`` covers every sample of the epochs
    needed for ``num_samples`` (at least ``num_samples``)."""

    INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")

    def __init__(self, name: str, indexed: MMapIndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: Optional[str] = None):
        if seq_length < 1:
            raise DataError(f"seq_length must be at least 1, got {seq_length}")
        if num_samples < 0:
            raise DataError(f"num_samples must be non-negative, got {num_samples}")
        self.name, self.indexed, self.seq_length, self.seed = name, indexed, seq_length, seed
        self.documents = np.asarray(documents, dtype=np.int64)
        if len(self.documents) == 0:
            raise DataError(f"dataset '{indexed.prefix}' ({name}) has no documents")
        self.tokens_per_epoch = int(indexed.sizes[self.documents].astype(np.int64).sum())
        if self.tokens_per_epoch < 2:
            raise DataError(f"dataset '{indexed.prefix}' ({name}) has {self.tokens_per_epoch} tokens; "
                            "need at least 2 to form one sample")
        self.num_samples_requested = num_samples
        paths = self._cache_paths(cache_dir, num_samples)
        arrays = self._load_or_build(paths, num_samples)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[n] for n in self.INDEX_NAMES)

    # ------------------------------------------------------------ index cache
    def _cache_paths(self, cache_dir: Optional[str], num_samples: int) -> Dict[str, Path]:
        prefix = Path(self.indexed.prefix)
        folder = Path(cache_dir) if cache_dir else prefix.parent
        fingerprint = "|".join(str(x) for x in (
            INDEX_CACHE_VERSION, prefix.resolve(), len(self.indexed), self.indexed.num_tokens,
            int(self.documents[0]), int(self.documents[-1]), len(self.documents), num_samples,
            self.seq_length, self.seed))
        key = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
        stem = f"{prefix.name}_{self.name}_{num_samples}ns_{self.seq_length}sl_{self.seed}s_{key}"
        return {n: folder / f"{stem}_{n}.npy" for n in self.INDEX_NAMES}

    def _load_or_build(self, paths: Dict[str, Path], num_samples: int) -> Dict[str, np.ndarray]:
        dist = _dist()
        is_builder = dist is None or dist.get_rank() == 0
        if is_builder and not all(p.is_file() for p in paths.values()):
            self._write(paths, self._build(num_samples))
        if dist is not None:
            dist.barrier()
            if not all(p.is_file() for p in paths.values()):  # no shared filesystem with rank 0
                self._write(paths, self._build(num_samples))
        try:
            return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
        except (OSError, ValueError) as e:
            raise DataError(f"index cache '{paths['doc_idx'].parent}' could not be read ({e}); delete its "
                            f"{self.indexed.prefix}* .npy files to rebuild them") from None

    def _write(self, paths: Dict[str, Path], arrays: Dict[str, np.ndarray]) -> None:
        folder = paths["doc_idx"].parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for n, p in paths.items():
                _save_npy_atomic(p, arrays[n])
        except OSError as e:
            raise DataError(f"cannot write the dataset index cache to '{folder}' ({e.strerror}); set "
                            "data_cache_dir to a writable folder") from None

    def _build(self, num_samples: int) -> Dict[str, np.ndarray]:
        epochs = num_epochs_needed(self.tokens_per_epoch, self.seq_length, num_samples)
        separate_last = False
        if epochs > 1:
            from_earlier = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
            per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
            separate_last = (num_samples - from_earlier) < int(LAST_EPOCH_SEPARATE_BELOW * per_epoch)
        rng = np.random.RandomState(self.seed)
        doc_idx = build_doc_idx(self.documents, epochs, rng, separate_last)
        sample_idx = build_sample_idx(self.indexed.sizes, doc_idx, self.seq_length, epochs,
                                      self.tokens_per_epoch)
        total = len(sample_idx) - 1
        first_part = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length if separate_last else total
        shuffle_idx = build_shuffle_idx(first_part, total, rng)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    # ------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        j = int(self.shuffle_idx[i])
        (doc_first, off_first), (doc_last, off_last) = self.sample_idx[j], self.sample_idx[j + 1]
        doc_first, off_first, doc_last, off_last = int(doc_first), int(off_first), int(doc_last), int(off_last)
        get = self.indexed.get
        if doc_first == doc_last:
            tokens = get(int(self.doc_idx[doc_first]), off_first, off_last - off_first + 1)
        else:
            parts = [get(int(self.doc_idx[doc_first]), off_first)]
            parts += [get(int(self.doc_idx[k])) for k in range(doc_first + 1, doc_last)]
            parts.append(get(int(self.doc_idx[doc_last]), 0, off_last + 1))
            tokens = np.concatenate(parts)
        return {"text": tokens.astype(np.int64)}


def document_ranges(indexed: MMapIndexedDataset, split: str) -> List[np.ndarray]:
    """Sequence indices of the train, valid and test documents of ``indexed`` under ``split``."""
    bounds = split_boundaries(split, indexed.num_documents)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        first, last = int(indexed.doc_idx[lo]), int(indexed.doc_idx[hi])
        out.append(np.arange(first, last, dtype=np.int64))
    return out


def samples_per_dataset(weights: Sequence[float], num_samples: int) -> List[int]:
    """Samples to build from each blended dataset: its share plus 0.5% headroom."""
    return [int(math.ceil(w * num_samples * 1.005)) for w in weights]


def open_datasets(prefixes: Sequence[str]) -> List[MMapIndexedDataset]:
    if not prefixes:
        raise DataError("no data prefixes given; expected at least one PREFIX of PREFIX.bin/PREFIX.idx")
    return [MMapIndexedDataset(p) for p in prefixes]


def normalized_weights(weights: Optional[Sequence[float]], datasets: Sequence[MMapIndexedDataset]) -> List[float]:
    """``None`` weights mix the datasets in proportion to their token counts."""
    if weights is None:
        weights = [d.num_tokens for d in datasets]
    if len(weights) != len(datasets):
        raise DataError(f"{len(weights)} weights given for {len(datasets)} data prefixes; expected one each")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data weights {list(weights)} must be non-negative with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


"""Entry points the trainer calls: train/valid/test from one split, or a whole dataset per path list."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

from megatron.data.blendable_dataset import BlendableDataset
from megatron.errors import DataError
from megatron.data.gpt_dataset import (GPTDataset, document_ranges, normalized_weights, open_datasets, parse_split,
                                       samples_per_dataset)
from megatron.data.indexed_dataset import MMapIndexedDataset

Dataset = Union[GPTDataset, BlendableDataset]
Warn = Callable[[str], None]
SPLIT_NAMES = ("train", "valid", "test")
SPLIT_USE = ("training", "validation", "test evaluation")


def _silent(message: str) -> None:
    pass


def _blend(children: List[Optional[GPTDataset]], weights: Sequence[float], num_samples: int) -> Optional[Dataset]:
    """Blend the non-empty children; their weights are renormalized among themselves."""
    present = [(c, w) for c, w in zip(children, weights) if c is not None and w > 0]
    if not present:
        return None
    if len(present) == 1:
        return present[0][0]
    datasets, kept_weights = zip(*present)
    size = num_samples if num_samples > 0 else sum(len(d) for d in datasets)
    return BlendableDataset(list(datasets), list(kept_weights), size)


def build_train_valid_test_datasets(data_prefixes: List[str], weights: Optional[List[float]], split: str,
                                    seq_length: int, seed: int, num_samples: Tuple[int, int, int],
                                    cache_dir: Optional[str] = None, warn: Warn = _silent
                                    ) -> Tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """Split each prefix's documents by ``split`` ("969,30,1"), build GPT samples per split and blend the
    prefixes by ``weights`` (None: by token count). A split with no documents yields None; when its
    weight is not zero (it rounded to zero documents) ``warn`` gets one line saying so."""
    if len(num_samples) != 3:
        raise DataError(f"num_samples must give (train, valid, test) counts, got {num_samples}")
    indexed = open_datasets(data_prefixes)
    shares = normalized_weights(weights, indexed)
    split_weights = parse_split(split)
    per_split: List[List[Optional[GPTDataset]]] = [[], [], []]
    rounded_away: List[List[MMapIndexedDataset]] = [[], [], []]
    for ds, share in zip(indexed, shares):
        for k, documents in enumerate(document_ranges(ds, split)):
            if split_weights[k] > 0 and len(documents) == 0:
                rounded_away[k].append(ds)
            wanted = num_samples[k] if len(indexed) == 1 else samples_per_dataset([share], num_samples[k])[0]
            per_split[k].append(_gpt_or_none(SPLIT_NAMES[k], ds, documents, wanted, seq_length, seed,
                                             cache_dir, warn))
    out = [_blend(per_split[k], shares, num_samples[k]) for k in range(3)]
    for k in (1, 2):  # an empty training split is an error (the trainer's)
        for ds in rounded_away[k]:
            effect = f"no {SPLIT_USE[k]}" if out[k] is None else f"this dataset takes no part in {SPLIT_USE[k]}"
            warn(f"warning: split '{split}' rounds the {SPLIT_NAMES[k]} part of '{ds.prefix}' ({ds.num_documents} "
                 f"documents in all) to zero documents: {effect}")
    return out[0], out[1], out[2]


def _gpt_or_none(name: str, indexed: MMapIndexedDataset, documents, num_samples: int, seq_length: int,
                 seed: int, cache_dir: Optional[str], warn: Warn = _silent) -> Optional[GPTDataset]:
    tokens = int(indexed.sizes[documents].sum()) if len(documents) else 0
    if tokens < 2:
        return None
    if tokens <= seq_length:  # a sample is seq_length + 1 tokens
        part = "" if name == "all" else f"the {name} part of "
        warn(f"warning: {part}'{indexed.prefix}' holds {tokens} tokens, fewer than one sequence (seq_length "
             f"{seq_length} + 1): every sample repeats the same text")
    return GPTDataset(name, indexed, documents, num_samples, seq_length, seed, cache_dir)


def build_dataset(prefixes: List[str], weights: Optional[List[float]], seq_length: int, seed: int,
                  num_samples: int, cache_dir: Optional[str] = None, warn: Warn = _silent) -> Dataset:
    """All documents of each prefix (NeoX ``train_data_paths`` / ``valid_data_paths``), blended by weight."""
    import numpy as np

    indexed = open_datasets(prefixes)
    shares = normalized_weights(weights, indexed)
    children: List[Optional[GPTDataset]] = []
    for ds, share in zip(indexed, shares):
        wanted = num_samples if len(indexed) == 1 else samples_per_dataset([share], num_samples)[0]
        children.append(_gpt_or_none("all", ds, np.arange(len(ds), dtype=np.int64), wanted, seq_length,
                                     seed, cache_dir, warn))
    blended = _blend(children, shares, num_samples)
    if blended is None:
        raise DataError(f"data prefixes {list(prefixes)} hold no tokens; expected indexed datasets with "
                        "at least one document of 2+ tokens")
    return blended

"""Deterministic micro-batches from a sample-indexed dataset, resumable by consumed samples.

Global batch ``g`` holds samples ``[g * G, (g + 1) * G)`` with ``G = micro * accum * dp``; micro-step
``a`` of data-parallel rank ``r`` takes the slice ``[a * micro * dp + r * micro, ... + micro)``.
Any data-parallel layout of the same global batch sees the same samples.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np
import torch


def global_batch_indices(consumed: int, global_batch: int, micro: int, accum: int, dp_size: int,
                         dp_rank: int, dataset_len: int) -> List[List[int]]:
    """Sample indices of each micro-batch (accum lists of ``micro``) for this rank."""
    out = []
    for a in range(accum):
        start = consumed + a * micro * dp_size + dp_rank * micro
        out.append([(start + i) % dataset_len for i in range(micro)])
    return out


def collate(dataset, indices: List[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(dataset[i]["text"], dtype=np.int64) for i in indices]))


def train_batches(dataset, consumed_samples: int, micro: int, accum: int, dp_size: int,
                  dp_rank: int) -> Iterator[List[torch.Tensor]]:
    """Yields, per iteration, the ``accum`` micro-batches [micro, seq+1] of this rank."""
    global_batch = micro * accum * dp_size
    consumed = consumed_samples
    while True:
        idx = global_batch_indices(consumed, global_batch, micro, accum, dp_size, dp_rank, len(dataset))
        yield [collate(dataset, i) for i in idx]
        consumed += global_batch

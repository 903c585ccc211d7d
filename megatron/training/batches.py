"""Deterministic micro-batches from a sample-indexed dataset, resumable by consumed samples.

Global batch ``g`` holds samples ``[g * G, (g + 1) * G)`` with ``G = micro * accum * dp``; micro-step
``a`` of data-parallel rank ``r`` takes the slice ``[a * micro * dp + r * micro, ... + micro)``.
Any data-parallel layout of the same global batch sees the same samples. With ``num_workers`` > 0 a
torch DataLoader prepares the next iterations' micro-batches in that many worker processes (NeoX's
``num_workers``); the batches are the same. The workers ignore stop signals: a scheduler signals every
process of a job (SLURM: all of a step's), and the stop is the training process's to make; it ends
its workers when it is done.
"""
from __future__ import annotations

import itertools
import signal
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


def _ignore_stop_signals(worker_id: int) -> None:
    from megatron.training.exit_signals import EXIT_SIGNALS

    for s in EXIT_SIGNALS:  # replaces torch's worker handler for SIGTERM, which dies (see the module doc)
        signal.signal(s, signal.SIG_IGN)


class IterationBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of the k-th iteration after ``consumed_samples``."""

    def __init__(self, dataset, consumed_samples: int, micro: int, accum: int, dp_size: int, dp_rank: int,
                 steps: int):
        self.dataset, self.consumed, self.steps = dataset, consumed_samples, steps
        self.micro, self.accum, self.dp_size, self.dp_rank = micro, accum, dp_size, dp_rank
        self.global_batch = micro * accum * dp_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> List[torch.Tensor]:
        idx = global_batch_indices(self.consumed + k * self.global_batch, self.global_batch, self.micro,
                                   self.accum, self.dp_size, self.dp_rank, len(self.dataset))
        return [collate(self.dataset, i) for i in idx]


def train_batches(dataset, consumed_samples: int, micro: int, accum: int, dp_size: int,
                  dp_rank: int, num_workers: int = 0, steps: int = 0) -> Iterator[List[torch.Tensor]]:
    """Yields, per iteration, the ``accum`` micro-batches [micro, seq+1] of this rank (``steps`` of
    them when given, else forever)."""
    if num_workers > 0 and steps > 0:
        items = IterationBatches(dataset, consumed_samples, micro, accum, dp_size, dp_rank, steps)
        yield from torch.utils.data.DataLoader(items, batch_size=None, shuffle=False, num_workers=num_workers,
                                               prefetch_factor=2, persistent_workers=False,
                                               worker_init_fn=_ignore_stop_signals)
        return
    global_batch = micro * accum * dp_size
    consumed = consumed_samples
    for _ in itertools.count() if steps <= 0 else range(steps):
        idx = global_batch_indices(consumed, global_batch, micro, accum, dp_size, dp_rank, len(dataset))
        yield [collate(dataset, i) for i in idx]
        consumed += global_batch

"""Deterministic weighted mixing of several datasets.

Sample ``i`` is taken from the dataset that is furthest behind its target share ``weight * (i + 1)``;
this keeps every dataset within one sample of its share at every prefix, with no randomness (the
children already shuffle their own samples by seed).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron.errors import DataError


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, index of that sample within its dataset) for ``size`` samples."""
    total = float(sum(weights))
    shares = [float(w) / total for w in weights]
    taken = [0] * len(shares)
    dataset_index = np.empty(size, dtype=np.int16 if len(shares) < 2 ** 15 else np.int32)
    sample_index = np.empty(size, dtype=np.int64)
    order = range(len(shares))
    for i in range(size):
        target = i + 1
        best = max(order, key=lambda d: shares[d] * target - taken[d])
        dataset_index[i] = best
        sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


class BlendableDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise DataError(f"blending needs one weight per dataset, got {len(weights)} weights for "
                            f"{len(datasets)} datasets")
        if size < 0:
            raise DataError(f"blended dataset size must be non-negative, got {size}")
        self.datasets: List = list(datasets)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, size)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        child = self.datasets[int(self.dataset_index[i])]
        # Children are built with >= their share (+0.5%), the modulo only guards rounding at the very end.
        return child[int(self.dataset_sample_index[i]) % len(child)]

"""The per-entry bookkeeping of a streaming KV cache: one ledger for both caches.

Our streaming engine's cache (``megatron/inference/kv_cache.py``, batch 1) and the transformers
``SepLLMCache`` an HF export ships (``sepllm_cache.py``, batch B) keep, next to their key/value
tensors, the same facts about every entry in stream order -- stream position, token id, separator
flag, and whatever else each needs (rotary positions; documents and padding) -- and move them in
step with the tensors when entries are evicted. Each field is a [B, capacity] buffer, preallocated
and grown on demand; reading a field (``ledger.positions``) gives the [B, length] entries held.

This file is shipped inside exported model directories: it imports only torch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class StreamLedger:
    def __init__(self, batch: int, device: torch.device | str, fields: Dict[str, torch.dtype], capacity: int = 0):
        self.device = torch.device(device)
        self.fields = tuple(fields)
        self._store = {name: torch.empty(batch, capacity, dtype=dtype, device=self.device)
                       for name, dtype in fields.items()}
        self.length = 0

    def __getattr__(self, name: str) -> torch.Tensor:
        store = self.__dict__.get("_store")
        if store is not None and name in store:
            return store[name][:, :self.length]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def batch(self) -> int:
        return next(iter(self._store.values())).shape[0]

    @property
    def capacity(self) -> int:
        return next(iter(self._store.values())).shape[1]

    def resize(self, capacity: int) -> None:
        """Room for ``capacity`` entries, keeping the ones held."""
        n = self.length
        for name, old in self._store.items():
            new = old.new_empty(old.shape[0], capacity)
            if n:
                new[:, :n] = old[:, :n]
            self._store[name] = new

    def append(self, entries: Dict[str, torch.Tensor]) -> None:
        """Record new entries: ``entries[field]`` [B, L] for every field."""
        L = next(iter(entries.values())).shape[1]
        end = self.length + L
        if end > self.capacity:
            self.resize(max(end, 2 * self.capacity))
        for name, buf in self._store.items():
            buf[:, self.length:end] = entries[name]
        self.length = end

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Overwrite ``values`` [B, m] of field ``name`` from entry ``start`` on."""
        self._store[name][:, start:start + values.shape[1]] = values

    def retain(self, keep: torch.Tensor, drop: Optional[Tuple[int, int]] = None) -> None:
        """Keep entries ``keep`` (ascending) at the front. ``drop=(start, end)`` says keep is everything
        but that one range: then a slice move replaces the (slower) gather."""
        n = len(keep)
        if drop is not None:
            start, end = drop
            for buf in self._store.values():
                buf[:, start:n] = buf[:, end:self.length].clone()
        else:
            keep = keep.to(self.device)
            for buf in self._store.values():
                buf[:, :n] = buf[:, keep]  # advanced indexing copies first, so the overlap is safe
        self.length = n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Reorder / repeat / drop rows (beam search)."""
        rows = rows.to(self.device)
        for name, buf in self._store.items():
            self._store[name] = buf[rows]

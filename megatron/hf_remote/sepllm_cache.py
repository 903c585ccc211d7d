"""Streaming-SepLLM KV cache as a transformers ``Cache``: bounded memory for ``model.generate``.

Per layer the entries are kept in stream order and read as four regions::

    [ initial (a) | separators (<= s) | past window | local window (w) ]

Nothing is evicted until appending would push the length past the budget ``cache_size`` c. Then the
past window is compressed: its separators move into the separator region (the oldest beyond s are
dropped) and its other entries are evicted. ``streamingllm`` keeps the first a entries and the most
recent ones; ``full`` never evicts (grows like ``DynamicCache``). The decisions come from
``sepllm_budget.plan_eviction``, which our own engine (tools/generate.py) uses too.

All layers share one eviction decision (it depends on token ids only). The per-entry bookkeeping
(stream position, separator flag, document, padding) lives in a ``StreamLedger`` (``stream_ledger.py``,
shared with our own engine's cache) next to the tensors.
Under positional shift (``enable_pos_shift``) keys are rotated by their place in the cache: when an
eviction moves an entry from place p to place q, its cached (already rotated) key is turned by q - p.

This file is shipped inside exported model directories: it imports only torch and transformers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .sepllm_budget import CacheBudget, plan_eviction
from .stream_ledger import StreamLedger


class BatchStreamLedger(StreamLedger):
    """The ledger (``stream_ledger.py``) of a batch of streams: per entry stream (rule) position, token id,
    separator flag, document id, position in the document, and whether the entry is a real token (not
    padding). ``seen``/``docs``/``doc_start`` [B] carry the running counters of each row's stream."""

    FIELDS = ("positions", "token_ids", "is_sep", "doc_ids", "pos_in_doc", "valid")

    def __init__(self, batch: int, device: torch.device):
        super().__init__(batch, device, {"positions": torch.long, "token_ids": torch.long, "is_sep": torch.bool,
                                         "doc_ids": torch.long, "pos_in_doc": torch.long, "valid": torch.bool})
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.docs = torch.zeros_like(self.seen)
        self.doc_start = torch.zeros_like(self.seen)

    def append(self, entries: dict, counters: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        super().append(entries)
        self.seen, self.docs, self.doc_start = counters

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        rows = rows.to(self.device)
        self.seen, self.docs, self.doc_start = self.seen[rows], self.docs[rows], self.doc_start[rows]


def turn_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate rotate-half rotary keys [B, H, m, D] (first 2 * len(inv_freq) channels) by ``delta`` [m]
    more positions: R(p + delta) k = R(delta) R(p) k."""
    rot = 2 * inv_freq.numel()
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(device=delta.device, dtype=torch.float64)[None]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(keys.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(keys.dtype)
    part = keys[..., :rot]
    half = rot // 2
    turned = part * cos + torch.cat([-part[..., half:], part[..., :half]], dim=-1) * sin
    return torch.cat([turned, keys[..., rot:]], dim=-1)


class SepLLMCacheLayer(CacheLayerMixin):
    """One layer's K/V [B, H, slots, D], preallocated to the budget (bounded) or grown by doubling."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, capacity: Optional[int] = None):
        super().__init__()
        self.capacity = capacity
        self.length = 0  # entries held
        self.seen = 0  # tokens this layer has been given (what generate calls the sequence length)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots = self.capacity or max(64, key_states.shape[-2])
        self.device = key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:2], slots, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:2], slots, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        slots = max(needed, 2 * self.keys.shape[-2])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], slots, old.shape[-1])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            if self.capacity is not None:
                raise RuntimeError(f"SepLLMCache layer overflow: {end} entries > budget {self.capacity}; "
                                   "the model's SepLLM hooks must run before each forward")
            self._grow(end)
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length, self.seen = end, self.seen + key_states.shape[-2]
        return self.keys[:, :, :end], self.values[:, :, :end]

    def retain(self, keep: torch.Tensor, delta: Optional[torch.Tensor], inv_freq: Optional[torch.Tensor]) -> None:
        """Keep entries ``keep`` at the front; ``delta`` [len(keep)] turns moved rotary keys."""
        if not self.is_initialized or self.length == 0:
            return
        n = len(keep)
        keep = keep.to(self.device)
        self.keys[:, :, :n] = self.keys[:, :, keep]  # advanced indexing copies first: overlap is safe
        self.values[:, :, :n] = self.values[:, :, keep]
        if delta is not None and inv_freq is not None:
            moved = delta.nonzero()
            if len(moved):
                first = int(moved[0])
                self.keys[:, :, first:n] = turn_keys(self.keys[:, :, first:n], delta[first:].to(self.device),
                                                     inv_freq)
        self.length = n

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity if self.capacity is not None else -1

    def reset(self) -> None:
        self.length = self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SepLLMCache cannot be cropped (evicted entries are gone)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.device))
            self.values = self.values.index_select(0, beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class SepLLMCache(Cache):
    """The Streaming-SepLLM cache. Build it with ``model.sepllm_cache(...)`` (or directly, with the
    model's number of layers) and pass it as ``generate(..., past_key_values=cache)``; a SepLLM model
    binds it on first use. Bounded policies keep at most ``cache_size`` entries per layer."""

    def __init__(self, num_layers: int, policy: str = "sepllm", init_cache_size: int = 4,
                 sep_cache_size: int = 64, local_size: int = 256, cache_size: int = 800,
                 enable_pos_shift: bool = True, decode_mask: str = "cache"):
        self.budget = CacheBudget(policy, init_cache_size, sep_cache_size, local_size, cache_size,
                                  enable_pos_shift, decode_mask)
        capacity = cache_size if self.budget.bounded else None
        super().__init__(layers=[SepLLMCacheLayer(capacity) for _ in range(num_layers)])
        self.ledger: Optional[BatchStreamLedger] = None
        self.sep_end = 0  # end of the separator region (exclusive); starts after the initial region
        self.compressions = 0
        self.evicted = 0

    # ------------------------------------------------------------------ driven by the model's hooks
    def start_ledger(self, batch: int, device: torch.device) -> BatchStreamLedger:
        if self.ledger is None:
            if self.budget.policy == "sepllm" and batch != 1:
                raise ValueError(f"the SepLLM streaming cache serves one sequence at a time (got batch size "
                                 f"{batch}); generate one prompt per call, or use policy='full' / "
                                 "'streamingllm' for batches")
            self.ledger = BatchStreamLedger(batch, device)
        elif self.ledger.batch != batch:
            raise ValueError(f"this cache holds {self.ledger.batch} sequence(s) but the input has {batch}")
        return self.ledger

    def make_room(self, n_new: int, inv_freq: Optional[torch.Tensor]) -> None:
        """Evict (per the policy) so that ``n_new`` more entries fit; turn moved rotary keys."""
        ledger = self.ledger
        flags = ledger.is_sep[0] if ledger.length else torch.zeros(0, dtype=torch.bool)
        plan = plan_eviction(self.budget, ledger.length, self.sep_end, flags, n_new)
        if plan is None:
            return
        keep, self.sep_end = plan
        if self.budget.policy == "sepllm":
            self.compressions += 1
        delta = None
        if self.budget.enable_pos_shift:
            delta = torch.arange(len(keep)) - keep  # new place - old place (<= 0)
        for layer in self.layers:
            layer.retain(keep, delta, inv_freq)
        self.evicted += ledger.length - len(keep)
        ledger.retain(keep)

    def committed(self) -> None:
        """Called once the ledger holds the new entries: the initial region grows with the stream."""
        a = self.budget.init_cache_size
        self.sep_end = max(self.sep_end, min(a, self.ledger.length))

    # ------------------------------------------------------------------ inspection
    @property
    def length(self) -> int:
        """Entries held per layer (bounded by ``cache_size`` under a bounded policy)."""
        return self.ledger.length if self.ledger is not None else 0

    def kept_positions(self):
        return self.ledger.positions[0].tolist() if self.ledger is not None else []

    def kept_token_ids(self):
        return self.ledger.token_ids[0].tolist() if self.ledger is not None else []

    def region_sizes(self) -> dict:
        """Entries per region: initial, separators, past window, local window."""
        a, w, n = self.budget.init_cache_size, self.budget.local_size, self.length
        init = min(a, n)
        if self.budget.policy != "sepllm":
            return {"initial": init, "separators": 0, "past_window": 0, "local_window": n - init}
        local = min(w, n - self.sep_end)
        return {"initial": init, "separators": self.sep_end - init,
                "past_window": n - self.sep_end - local, "local_window": local}

    def nbytes(self) -> int:
        """Bytes of the K/V entries held (all layers)."""
        return sum(layer.keys[:, :, :layer.length].nbytes + layer.values[:, :, :layer.length].nbytes
                   for layer in self.layers if layer.is_initialized)

    def allocated_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    # ------------------------------------------------------------------ batch reshuffles (beam search)
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.ledger is not None:
            self.ledger.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.ledger is not None:
            self.ledger.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.ledger is not None:
            rows = torch.arange(self.ledger.batch).repeat_interleave(repeats)
            self.ledger.select_rows(rows)

    def reset(self):
        super().reset()
        self.ledger, self.sep_end, self.compressions, self.evicted = None, 0, 0, 0

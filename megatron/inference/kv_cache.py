"""Bounded KV cache of Streaming-SepLLM (batch size 1).

Per layer the entries are kept in stream order and read as four regions::

    [ initial (a) | separators (<= s) | past window | local window (w) ]

Nothing is evicted until appending would push the length past the budget ``cache_size`` c. Then the
past window (everything between the separator region and the last w entries) is compressed: its
separators move into the separator region (the oldest beyond s are dropped) and its other tokens
are evicted. ``a + s + w < c`` guarantees that at least ``c - (a + s + w)`` slots are free after a
compression, so the cache never holds more than c entries, the new tokens included.

``streamingllm`` keeps the first a entries and the most recent ``c - a`` (one eviction per step);
``full`` never evicts (the comparison baseline, grows without bound).
The budget checks and the eviction decision are ``megatron/hf_remote/sepllm_budget.py``'s, shared
with the transformers cache that HF exports ship, so tools/generate.py and ``generate`` agree.

Keys are stored before rotary; the stream position, token id and separator flag of every entry
are kept alongside (``hf_remote/stream_ledger.py``, the ledger the HF export's cache keeps too), so
the engine can rotate keys by stream position or by place in the cache
(positional shift) and apply the Sep-Attention rule inside the cache. All layers share one
eviction decision (it depends on token ids only), so the bookkeeping exists once.

With rotary, a second key buffer holds the rotated keys, and ``rotary_positions`` the position each
was rotated with. Places only change when entries are evicted, so under positional shift only the
entries that moved are re-rotated (once per compression for SepLLM, not once per step).

Batch size is 1: each stream compresses at its own moments, which a padded batch cannot share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron.errors import InferenceError
from megatron.hf_remote.sepllm_budget import DECODE_MASKS, POLICIES, CacheBudget, plan_eviction  # noqa: F401
from megatron.hf_remote.stream_ledger import StreamLedger

LEDGER_FIELDS = {"positions": torch.long, "token_ids": torch.long, "is_sep": torch.bool,
                 "rotary_positions": torch.long}


@dataclass(frozen=True)
class CacheConfig(CacheBudget):
    """The cache budget (``sepllm_budget.CacheBudget``: fields, defaults and checks defined once, shared
    with the HF export's cache), with a bad budget reported as a user error."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as err:
            raise InferenceError(str(err)) from None


class StreamingKVCache:
    """Preallocated per-layer K/V buffers [1, capacity, Hkv, D] plus shared per-entry bookkeeping."""

    def __init__(self, config: CacheConfig, layer_ids: Iterable[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", rotary: bool = True):
        self.config = config
        self.rotary = rotary
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, torch.device(device)
        self.layer_ids = list(layer_ids)
        self.capacity = 0 if config.policy == "full" else config.cache_size
        self.keys: Dict[int, torch.Tensor] = {}  # unrotated
        self.values: Dict[int, torch.Tensor] = {}
        self.rotated_keys: Dict[int, torch.Tensor] = {}  # only with rotary
        self.rotated_valid = 0  # entries [0, rotated_valid) are rotated with their current rotary position
        # Per entry: stream position, token id, separator flag, the position its rotated key was rotated by.
        self.ledger = StreamLedger(1, self.device, LEDGER_FIELDS)
        self._allocate(self.capacity)
        self.sep_end = 0  # end of the separator region (exclusive); starts after the initial region
        self.tokens_seen = 0
        self.compressions = 0
        self.evicted = 0

    # ------------------------------------------------------------------ storage
    @property
    def length(self) -> int:
        return self.ledger.length

    @property
    def positions(self) -> torch.Tensor:
        return self.ledger.positions[0]

    @property
    def token_ids(self) -> torch.Tensor:
        return self.ledger.token_ids[0]

    @property
    def is_sep(self) -> torch.Tensor:
        return self.ledger.is_sep[0]

    @property
    def rotary_positions(self) -> torch.Tensor:
        return self.ledger.rotary_positions[0]

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate every buffer with ``capacity`` slots, keeping the first ``length`` entries."""
        n = self.length
        for store in self._stores():
            for layer in self.layer_ids:
                buf = torch.empty((1, capacity, self.kv_heads, self.head_dim), dtype=self.dtype, device=self.device)
                if n:
                    buf[:, :n] = store[layer][:, :n]
                store[layer] = buf
        self.ledger.resize(capacity)
        self.capacity = capacity

    def _stores(self):
        return (self.keys, self.values, self.rotated_keys) if self.rotary else (self.keys, self.values)

    def nbytes(self) -> int:
        """Bytes of the K/V entries currently held (all layers)."""
        per_entry = 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        return per_entry * self.length * len(self.layer_ids)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store.values())

    # ------------------------------------------------------------------ eviction
    def make_room(self, n_new: int) -> None:
        """Evict (per the policy, ``sepllm_budget.plan_eviction``) so that ``n_new`` more entries fit."""
        cfg = self.config
        try:
            plan = plan_eviction(cfg, self.length, self.sep_end, self.is_sep[:self.length], n_new)
        except ValueError as err:
            raise InferenceError(str(err)) from None
        if cfg.policy == "full":
            if self.length + n_new > self.capacity:
                self._allocate(max(self.length + n_new, 2 * self.capacity, 64))
            return
        if plan is None:
            return
        keep, self.sep_end = plan
        if cfg.policy == "streamingllm":  # keep = the first a and a recent tail: one slice move
            a = cfg.init_cache_size
            self._retain(keep.to(self.device), drop=(a, self.length - (len(keep) - a)))
        else:
            self.compressions += 1
            self._retain(keep.to(self.device))

    def _retain(self, keep: torch.Tensor, drop: Optional[Tuple[int, int]] = None) -> None:
        """Keep entries ``keep`` (ascending) at the front. ``drop=(start, end)`` says keep is everything
        but that one range: then a slice move replaces the (slower) gather."""
        n = len(keep)
        if drop is not None:
            start, end = drop
            for store in self._stores():
                for buf in store.values():
                    buf[:, start:n] = buf[:, end:self.length].clone()
        else:
            for store in self._stores():
                for buf in store.values():
                    buf[:, :n] = buf[:, keep]  # advanced indexing copies first, so the overlap is safe
        if self.config.enable_pos_shift:  # an entry that moved has a new place: its rotation is stale
            moved = (keep != torch.arange(n, device=keep.device)).nonzero()
            self.rotated_valid = min(self.rotated_valid, int(moved[0]) if len(moved) else n)
        else:
            self.rotated_valid = min(self.rotated_valid, n)
        self.evicted += self.length - n
        self.ledger.retain(keep, drop)

    # ------------------------------------------------------------------ appending
    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              k_new_rotated: Optional[torch.Tensor] = None) -> None:
        """Store this layer's new keys (unrotated, and rotated when the model has rotary) and values
        [1, L, Hkv, D] after the cached ones. ``commit`` must follow after every layer."""
        end = self.length + k_new.shape[1]
        self.keys[layer][:, self.length:end] = k_new
        self.values[layer][:, self.length:end] = v_new
        if self.rotary:
            self.rotated_keys[layer][:, self.length:end] = k_new_rotated

    def rerotate(self, layer: int, start: int, rotate_fn) -> None:
        """Refresh the rotated keys of entries [start, length) with ``rotate_fn(raw keys)``."""
        self.rotated_keys[layer][:, start:self.length] = rotate_fn(self.keys[layer][:, start:self.length])

    def attention_kv(self, layer: int, end: int):
        """Keys as attention uses them (rotated when the model has rotary) and values, [1, end, Hkv, D]."""
        keys = self.rotated_keys[layer] if self.rotary else self.keys[layer]
        return keys[:, :end], self.values[layer][:, :end]

    def commit(self, token_ids: torch.Tensor, positions: torch.Tensor, is_sep: torch.Tensor,
               rotary_positions: Optional[torch.Tensor] = None) -> None:
        """Record the bookkeeping of the L entries every layer has just written (1-D tensors);
        ``rotary_positions`` covers the re-rotated entries too: [rotated_valid, length + L)."""
        n, L = self.length, token_ids.numel()
        end = n + L
        new_rotary = positions if rotary_positions is None else rotary_positions[rotary_positions.numel() - L:]
        self.ledger.append({"token_ids": token_ids[None], "positions": positions[None], "is_sep": is_sep[None],
                            "rotary_positions": new_rotary[None]})
        if rotary_positions is not None and self.rotated_valid < n:  # re-rotated entries
            self.ledger.write("rotary_positions", self.rotated_valid, rotary_positions[None, :n - self.rotated_valid])
        self.rotated_valid = end
        if self.sep_end < min(self.config.init_cache_size, end):
            self.sep_end = min(self.config.init_cache_size, end)
        self.tokens_seen += token_ids.numel()

    # ------------------------------------------------------------------ inspection
    def kept_rotary_positions(self) -> List[int]:
        return self.rotary_positions[: self.length].tolist()

    def kept_positions(self) -> List[int]:
        return self.positions[: self.length].tolist()

    def kept_token_ids(self) -> List[int]:
        return self.token_ids[: self.length].tolist()

    def region_sizes(self) -> Dict[str, int]:
        """Entries per region: initial, separators, past window, local window."""
        a, w = self.config.init_cache_size, self.config.local_size
        init = min(a, self.length)
        if self.config.policy != "sepllm":
            return {"initial": init, "separators": 0, "past_window": 0, "local_window": self.length - init}
        seps = self.sep_end - init
        local = min(w, self.length - self.sep_end)
        return {"initial": init, "separators": seps, "past_window": self.length - self.sep_end - local,
                "local_window": local}

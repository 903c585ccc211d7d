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

Keys are stored before rotary; the stream position, token id and separator flag of every entry
are kept alongside, so the engine can rotate keys by stream position or by place in the cache
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

POLICIES = ("sepllm", "streamingllm", "full")
# "cache": a query sees every cached key (the reference Streaming-SepLLM behaviour);
# "rule": a query sees the cached keys the Sep-Attention rule of its layer allows.
DECODE_MASKS = ("cache", "rule")


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "sepllm"
    init_cache_size: int = 4
    sep_cache_size: int = 64
    local_size: int = 256
    cache_size: int = 800
    enable_pos_shift: bool = True
    decode_mask: str = "cache"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InferenceError(f"cache policy must be one of {POLICIES}, got {self.policy!r}")
        if self.decode_mask not in DECODE_MASKS:
            raise InferenceError(f"decode_mask must be one of {DECODE_MASKS}, got {self.decode_mask!r}")
        a, s, w, c = self.init_cache_size, self.sep_cache_size, self.local_size, self.cache_size
        if min(a, s, w) < 0 or c < 1:
            raise InferenceError(f"cache sizes must be >= 0 and cache_size >= 1; got init_cache_size={a}, "
                                 f"sep_cache_size={s}, local_size={w}, cache_size={c}")
        if self.policy == "full":
            return
        if self.policy == "streamingllm":  # keeps the initial a + the most recent c - a; local_size unused
            if a >= c:
                raise InferenceError(f"StreamingLLM cache needs init_cache_size < cache_size; got {a} >= {c}")
            return
        if c < a + w:
            raise InferenceError(f"cache_size {c} is smaller than init_cache_size + local_size = {a} + {w} = "
                                 f"{a + w}; raise cache_size or shrink the windows")
        if a + s + w >= c:
            raise InferenceError(f"SepLLM cache needs init_cache_size + sep_cache_size + local_size < cache_size; "
                                 f"got {a} + {s} + {w} = {a + s + w} >= {c} (no room for new tokens after "
                                 "compression)")

    @property
    def max_new_per_forward(self) -> Optional[int]:
        """Most tokens one forward may append (the room guaranteed after eviction); None = unbounded."""
        if self.policy == "full":
            return None
        if self.policy == "streamingllm":
            return self.cache_size - self.init_cache_size
        return self.cache_size - (self.init_cache_size + self.sep_cache_size + self.local_size)


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
        self.rotary_positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.rotated_valid = 0  # entries [0, rotated_valid) are rotated with their current rotary position
        self.positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.token_ids = torch.empty(0, dtype=torch.long, device=self.device)
        self.is_sep = torch.empty(0, dtype=torch.bool, device=self.device)
        self.length = 0
        self._allocate(self.capacity)
        self.sep_end = 0  # end of the separator region (exclusive); starts after the initial region
        self.tokens_seen = 0
        self.compressions = 0
        self.evicted = 0

    # ------------------------------------------------------------------ storage
    def _allocate(self, capacity: int) -> None:
        """(Re)allocate every buffer with ``capacity`` slots, keeping the first ``length`` entries."""
        n = self.length

        def regrow(old: torch.Tensor, shape, dtype) -> torch.Tensor:
            new = torch.empty(shape, dtype=dtype, device=self.device)
            if n:
                new[:n] = old[:n]
            return new

        for store in self._stores():
            for layer in self.layer_ids:
                buf = torch.empty((1, capacity, self.kv_heads, self.head_dim), dtype=self.dtype, device=self.device)
                if n:
                    buf[:, :n] = store[layer][:, :n]
                store[layer] = buf
        self.positions = regrow(self.positions, (capacity,), torch.long)
        self.token_ids = regrow(self.token_ids, (capacity,), torch.long)
        self.is_sep = regrow(self.is_sep, (capacity,), torch.bool)
        self.rotary_positions = regrow(self.rotary_positions, (capacity,), torch.long)
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
        """Evict (per the policy) so that ``n_new`` more entries fit in the budget."""
        cfg = self.config
        limit = cfg.max_new_per_forward
        if limit is not None and n_new > limit:
            raise InferenceError(f"cannot append {n_new} tokens in one forward; at most {limit} fit this "
                                 "cache budget (use a smaller prefill chunk)")
        if cfg.policy == "full":
            if self.length + n_new > self.capacity:
                self._allocate(max(self.length + n_new, 2 * self.capacity, 64))
            return
        if self.length + n_new <= cfg.cache_size:
            return
        if cfg.policy == "streamingllm":
            a = cfg.init_cache_size
            recent = cfg.cache_size - a - n_new
            keep = torch.cat([torch.arange(a), torch.arange(self.length - recent, self.length)])
            self.sep_end = a
            self._retain(keep.to(self.device), drop=(a, self.length - recent))
        else:
            self._retain(self._sepllm_keep().to(self.device))

    def _sepllm_keep(self) -> torch.Tensor:
        cfg = self.config
        a, s, w = cfg.init_cache_size, cfg.sep_cache_size, cfg.local_size
        sep_start = min(a, self.length)
        sep_end = max(self.sep_end, sep_start)
        past_end = self.length - w
        old_seps = torch.arange(sep_start, sep_end)
        past = torch.arange(sep_end, past_end)
        new_seps = past[self.is_sep[sep_end:past_end].cpu()]
        seps = torch.cat([old_seps, new_seps])
        seps = seps[len(seps) - s:] if len(seps) > s else seps
        self.sep_end = sep_start + len(seps)
        self.compressions += 1
        return torch.cat([torch.arange(sep_start), seps, torch.arange(past_end, self.length)])

    def _retain(self, keep: torch.Tensor, drop: Optional[Tuple[int, int]] = None) -> None:
        """Keep entries ``keep`` (ascending) at the front. ``drop=(start, end)`` says keep is everything
        but that one range: then a slice move replaces the (slower) gather."""
        n = len(keep)
        if drop is not None:
            start, end = drop
            for store in self._stores():
                for buf in store.values():
                    buf[:, start:n] = buf[:, end:self.length].clone()
            for name in ("positions", "token_ids", "is_sep", "rotary_positions"):
                buf = getattr(self, name)
                buf[start:n] = buf[end:self.length].clone()
        else:
            for store in self._stores():
                for buf in store.values():
                    buf[:, :n] = buf[:, keep]  # advanced indexing copies first, so the overlap is safe
            for name in ("positions", "token_ids", "is_sep", "rotary_positions"):
                buf = getattr(self, name)
                buf[:n] = buf[keep]
        if self.config.enable_pos_shift:  # an entry that moved has a new place: its rotation is stale
            moved = (keep != torch.arange(n, device=keep.device)).nonzero()
            self.rotated_valid = min(self.rotated_valid, int(moved[0]) if len(moved) else n)
        else:
            self.rotated_valid = min(self.rotated_valid, n)
        self.evicted += self.length - n
        self.length = n

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
        end = self.length + token_ids.numel()
        self.token_ids[self.length:end] = token_ids
        self.positions[self.length:end] = positions
        self.is_sep[self.length:end] = is_sep
        if rotary_positions is not None:
            self.rotary_positions[self.rotated_valid:end] = rotary_positions
        self.rotated_valid = end
        if self.sep_end < min(self.config.init_cache_size, end):
            self.sep_end = min(self.config.init_cache_size, end)
        self.length = end
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

"""The Streaming-SepLLM cache budget and eviction policy: which entries survive when the cache is full.

One definition for both caches: our streaming engine's (``megatron/inference/kv_cache.py``, behind
tools/generate.py) and the transformers ``SepLLMCache`` an HF export ships (``sepllm_cache.py``).
Per layer the entries are read as ``[initial (a) | separators (<= s) | past window | local (w)]``; when
appending would exceed ``cache_size`` c, the past window is compressed: its separators join the
separator region (the oldest beyond s are dropped), its other entries are evicted. ``streamingllm``
keeps the first a and the most recent entries; ``full`` never evicts.

This file is shipped inside exported model directories: it imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

POLICIES = ("sepllm", "streamingllm", "full")
# "cache": a query sees every cached key (the reference Streaming-SepLLM behaviour);
# "rule": a query sees the cached keys the Sep-Attention rule of its layer allows.
DECODE_MASKS = ("cache", "rule")


@dataclass(frozen=True)
class CacheBudget:
    """Budgets a (initial), s (separators), w (local window), c (total entries per layer)."""

    policy: str = "sepllm"
    init_cache_size: int = 4
    sep_cache_size: int = 64
    local_size: int = 256
    cache_size: int = 800
    enable_pos_shift: bool = True
    decode_mask: str = "cache"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {self.policy!r}")
        if self.decode_mask not in DECODE_MASKS:
            raise ValueError(f"decode_mask must be one of {DECODE_MASKS}, got {self.decode_mask!r}")
        a, s, w, c = self.init_cache_size, self.sep_cache_size, self.local_size, self.cache_size
        if min(a, s, w) < 0 or c < 1:
            raise ValueError(f"cache sizes must be >= 0 and cache_size >= 1; got init_cache_size={a}, "
                             f"sep_cache_size={s}, local_size={w}, cache_size={c}")
        if self.policy == "streamingllm" and a >= c:
            raise ValueError(f"StreamingLLM cache needs init_cache_size < cache_size; got {a} >= {c}")
        if self.policy == "sepllm" and c < a + w:
            raise ValueError(f"cache_size {c} is smaller than init_cache_size + local_size = {a} + {w} = "
                             f"{a + w}; raise cache_size or shrink the windows")
        if self.policy == "sepllm" and a + s + w >= c:
            raise ValueError(f"SepLLM cache needs init_cache_size + sep_cache_size + local_size < cache_size; "
                             f"got {a} + {s} + {w} = {a + s + w} >= {c} (no room for new tokens after "
                             "compression)")

    @property
    def bounded(self) -> bool:
        return self.policy != "full"

    @property
    def max_new_per_forward(self) -> Optional[int]:
        """Most tokens one forward may append (the room guaranteed after eviction); None = unbounded."""
        if self.policy == "full":
            return None
        if self.policy == "streamingllm":
            return self.cache_size - self.init_cache_size
        return self.cache_size - (self.init_cache_size + self.sep_cache_size + self.local_size)


def plan_eviction(budget: CacheBudget, length: int, sep_end: int, is_sep: torch.Tensor,
                  n_new: int) -> Optional[Tuple[torch.Tensor, int]]:
    """Which entries to keep so that ``n_new`` more fit: (ascending keep indices, new end of the
    separator region), or None when nothing has to go. ``is_sep`` [length] holds the entries' flags."""
    limit = budget.max_new_per_forward
    if limit is not None and n_new > limit:
        raise ValueError(f"cannot append {n_new} tokens in one forward; at most {limit} fit this cache "
                         "budget (feed them in smaller chunks: a smaller prefill chunk, or "
                         "generate(..., prefill_chunk_size=N))")
    if not budget.bounded or length + n_new <= budget.cache_size:
        return None
    a = budget.init_cache_size
    if budget.policy == "streamingllm":
        recent = budget.cache_size - a - n_new
        return torch.cat([torch.arange(a), torch.arange(length - recent, length)]), a
    s, w = budget.sep_cache_size, budget.local_size
    sep_start = min(a, length)
    sep_end = max(sep_end, sep_start)
    past_end = length - w
    past = torch.arange(sep_end, past_end)
    seps = torch.cat([torch.arange(sep_start, sep_end), past[is_sep[sep_end:past_end].cpu()]])
    seps = seps[len(seps) - s:] if len(seps) > s else seps
    keep = torch.cat([torch.arange(sep_start), seps, torch.arange(past_end, length)])
    return keep, sep_start + len(seps)

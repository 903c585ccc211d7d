"""The token-id range of an indexed dataset, checked against the model's vocabulary when it is opened.

An id outside ``[0, vocab)`` would be an ``IndexError`` at the first step (a device-side assert on a
GPU), far from its cause: a dataset tokenized with another tokenizer. The range is computed once and
cached beside the index in ``PREFIX.tokens.json`` (smallest and largest id, keyed by the ``.bin``
file's size and modification time, so a rewritten dataset is rescanned); tools/preprocess_data.py
writes it while building, so a new dataset is never scanned at all.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Tuple

import numpy as np

from megatron.errors import DataError

SIDECAR_SUFFIX = ".tokens.json"
SCAN_CHUNK = 1 << 24  # tokens per np.min/np.max call


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


def _bin_key(prefix: str) -> dict:
    st = os.stat(f"{prefix}.bin")
    return {"bin_size": st.st_size, "bin_mtime_ns": st.st_mtime_ns}


def write_token_range(prefix: str, min_id: int, max_id: int) -> None:
    """Record the range of ``PREFIX.bin`` (best effort: a read-only directory is rescanned next time)."""
    record = {**_bin_key(prefix), "min_id": int(min_id), "max_id": int(max_id)}
    path = sidecar_path(prefix)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def _cached(prefix: str) -> Optional[Tuple[int, int]]:
    try:
        with open(sidecar_path(prefix)) as f:
            record = json.load(f)
        if {k: record.get(k) for k in ("bin_size", "bin_mtime_ns")} == _bin_key(prefix):
            return int(record["min_id"]), int(record["max_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def scan_token_range(tokens: np.ndarray) -> Tuple[int, int]:
    """(smallest, largest) id of a token array, chunk by chunk; (0, -1) when empty."""
    lo, hi = None, None
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return (0, -1) if lo is None else (lo, hi)


def token_range(prefix: str, open_tokens: Callable[[], np.ndarray]) -> Tuple[int, int]:
    """(smallest, largest) token id of ``PREFIX.bin``: from the cache, else scanned once (all tokens,
    from ``open_tokens()``, e.g. ``MMapIndexedDataset(prefix).token_array``) and cached."""
    cached = _cached(prefix)
    if cached is not None:
        return cached
    lo, hi = scan_token_range(open_tokens())
    write_token_range(prefix, lo, hi)
    return lo, hi


def check_token_ids(prefix: str, vocab_size: int, key: str, open_tokens: Callable[[], np.ndarray]) -> None:
    """DataError naming the file and the id when a token id does not fit the model's vocabulary."""
    lo, hi = token_range(prefix, open_tokens)
    if hi >= vocab_size:
        raise DataError(f"{key} '{prefix}': data file '{prefix}.bin' holds token id {hi} but the model's "
                        f"vocabulary has {vocab_size} entries (ids 0..{vocab_size - 1}); was it tokenized "
                        "with another tokenizer?")
    if lo < 0:
        raise DataError(f"{key} '{prefix}': data file '{prefix}.bin' holds negative token id {lo}: corrupted "
                        "or written with a signed dtype by another tool")

"""Megatron / GPT-NeoX memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), reader and builder.

``.idx`` layout, little-endian, no padding:
    magic      9 bytes  b"MMIDIDX\\x00\\x00"
    version    u64      1
    dtype      u8       token dtype code (table below)
    n_seq      u64      number of sequences
    n_doc_idx  u64      length of the document index (number of documents + 1)
    sizes      int32[n_seq]       tokens per sequence
    pointers   int64[n_seq]       byte offset of each sequence in ``.bin``
    doc_idx    int64[n_doc_idx]   sequence index where each document starts, then n_seq
``.bin`` is the token ids of all sequences back to back in that dtype.

Dtype codes 1-5 and 8 (uint8, int8, int16, int32, int64, uint16) mean the same in GPT-NeoX and
Megatron-Core. Codes 6 and 7 are float32/float64 in GPT-NeoX but float64/float32 in Megatron-Core, so
they are ambiguous; we never write float token files and refuse to read them.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Union

import numpy as np

from megatron.data.token_range import write_token_range
from megatron.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8

DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
AMBIGUOUS_FLOAT_CODES = (6, 7)


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        raise DataError(f"token dtype {dt} cannot be stored in an indexed dataset; expected one of "
                        f"{', '.join(str(np.dtype(v)) for v in DTYPE_CODES.values())}")
    return CODE_OF_DTYPE[dt]


def best_fitting_dtype(vocab_size: int) -> type:
    """uint16 when every id (< vocab_size) fits in it, else int32."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def check_vocab_fits(vocab_size: int, dtype) -> None:
    limit = int(np.iinfo(np.dtype(dtype)).max) + 1
    if vocab_size > limit:
        raise DataError(f"vocabulary of {vocab_size} tokens does not fit dtype {np.dtype(dtype)} "
                        f"(ids up to {limit - 1}); use --dtype int32 or auto")


def data_file_path(prefix: str) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str) -> str:
    return f"{prefix}.idx"


def index_bytes(dtype, sizes: Sequence[int], doc_idx: Sequence[int]) -> bytes:
    """The complete ``.idx`` content for sequences of ``sizes`` tokens and document index ``doc_idx``."""
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes_arr), dtype=np.int64)
    if len(sizes_arr) > 1:
        np.cumsum(sizes_arr[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_arr = np.asarray(doc_idx, dtype=np.int64)
    header = INDEX_MAGIC + struct.pack("<QBQQ", INDEX_VERSION, dtype_code(dtype), len(sizes_arr), len(doc_arr))
    return (header + sizes_arr.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
            + doc_arr.astype("<i8").tobytes())


def atomic_write_bytes(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MMapIndexedDataset:
    """Read-only view of an indexed dataset; ``ds[i]`` is sequence ``i`` as a numpy array (file dtype)."""

    def __init__(self, prefix: Union[str, os.PathLike]):
        self.prefix = str(prefix)
        self._read_index(index_file_path(self.prefix))
        self._open_data(data_file_path(self.prefix))

    def _read_index(self, path: str) -> None:
        if not os.path.isfile(path):
            raise DataError(f"index file '{path}' not found; expected the .idx written by tools/preprocess_data.py")
        file_size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = fh.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise DataError(f"index file '{path}' is not a Megatron mmap index: expected it to start with "
                            f"{INDEX_MAGIC!r} and a {HEADER_SIZE}-byte header")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(INDEX_MAGIC):])
        if version != INDEX_VERSION:
            raise DataError(f"index file '{path}' has version {version}; expected {INDEX_VERSION}")
        if code in AMBIGUOUS_FLOAT_CODES:
            raise DataError(f"index file '{path}' has float dtype code {code}, which GPT-NeoX and Megatron-Core "
                            "read differently; token files must use an integer dtype")
        if code not in DTYPE_CODES:
            raise DataError(f"index file '{path}' has unknown dtype code {code}; expected one of "
                            f"{sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if file_size != expected:
            raise DataError(f"index file '{path}' is {file_size} bytes but its header ({n_seq} sequences, "
                            f"{n_doc} doc-index entries) implies {expected}: truncated or corrupted")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._index_map = np.memmap(path, mode="r", dtype=np.uint8)
        buf = memoryview(self._index_map)
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=HEADER_SIZE + 4 * n_seq)
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=HEADER_SIZE + 12 * n_seq)
        self._check_index(path)

    def _check_index(self, path: str) -> None:
        n = len(self.sizes)
        if n and self.sizes.min() < 0:
            raise DataError(f"index file '{path}' has negative sequence sizes: corrupted")
        expected_ptr = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected_ptr[1:])
        if not np.array_equal(expected_ptr, self.pointers):
            bad = int(np.flatnonzero(expected_ptr != self.pointers)[0])
            raise DataError(f"index file '{path}': byte pointer of sequence {bad} is {int(self.pointers[bad])}, "
                            f"expected {int(expected_ptr[bad])} from the sizes: corrupted")
        d = self.doc_idx
        if len(d) == 0 or d[0] != 0 or d[-1] != n or (len(d) > 1 and np.any(np.diff(d) < 0)):
            raise DataError(f"index file '{path}': document index must rise from 0 to the sequence count {n}: "
                            "corrupted")

    def _open_data(self, path: str) -> None:
        if not os.path.isfile(path):
            raise DataError(f"data file '{path}' not found next to its index; expected the .bin written by "
                            "tools/preprocess_data.py")
        expected = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        actual = os.path.getsize(path)
        if actual != expected:
            state = "truncated" if actual < expected else "longer than its index says"
            raise DataError(f"data file '{path}' is {actual} bytes but its index describes {expected} bytes "
                            f"of {self.dtype} tokens: {state}")
        # np.memmap cannot map an empty file.
        self._data = (np.memmap(path, mode="r", dtype=self.dtype) if expected
                      else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.astype(np.int64).sum())

    @property
    def token_array(self) -> np.ndarray:
        """Every token of the dataset, memory-mapped, in file order."""
        return self._data

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of {size}")
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        return np.asarray(self._data[start:start + length])

    def __getitem__(self, idx: Union[int, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        return self.get(idx)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated)."""
        lo, hi = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        parts = [self.get(i) for i in range(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDatasetBuilder:
    """Appends sequences to a temporary ``.bin``; ``finalize`` writes the ``.idx`` and renames both into
    place, so an interrupted build never leaves a file under the final names."""

    def __init__(self, prefix: Union[str, os.PathLike], dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{data_file_path(self.prefix)}.tmp-{os.getpid()}"
        self._tmp_idx = f"{index_file_path(self.prefix)}.tmp-{os.getpid()}"
        self._bin: Optional[BinaryIO] = open(self._tmp_bin, "wb")
        self._sizes: List[int] = []
        self._doc_idx: List[int] = [0]
        self.num_tokens = 0
        self._id_range: Optional[List[int]] = None  # [min, max] token id, cached beside the index

    def add_item(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """One sequence (of the current document)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(len(arr))
        self.num_tokens += len(arr)
        if len(arr):
            lo, hi = int(arr.min()), int(arr.max())
            self._id_range = ([lo, hi] if self._id_range is None else
                              [min(lo, self._id_range[0]), max(hi, self._id_range[1])])

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        self.add_item(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def finalize(self) -> None:
        if self._bin is None:
            raise RuntimeError("builder already finalized or aborted")
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._bin = None
        if self._doc_idx[-1] != len(self._sizes):  # sequences added after the last end_document
            self._doc_idx.append(len(self._sizes))
        with open(self._tmp_idx, "wb") as fh:
            fh.write(index_bytes(self.dtype, self._sizes, self._doc_idx))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self._tmp_bin, data_file_path(self.prefix))
        os.replace(self._tmp_idx, index_file_path(self.prefix))
        write_token_range(self.prefix, *(self._id_range or (0, -1)))  # no scan when a run opens it

    def abort(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        for tmp in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

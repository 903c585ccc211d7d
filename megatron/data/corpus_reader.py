"""Reading raw documents: jsonl (optionally .gz/.zst) and plain text, with file:line for every item.

Items carry the undecoded bytes so that decoding and JSON parsing can happen in worker processes.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple

from megatron.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}

# An item is (path, line number or 0 for a whole file, raw payload, payload is jsonl).
Item = Tuple[str, int, bytes, bool]


def expand_inputs(specs: List[str]) -> List[str]:
    paths: List[str] = []
    for spec in specs:
        for part in (p for p in spec.split(",") if p):
            if os.path.isdir(part):
                found = sorted(str(p) for p in Path(part).rglob("*") if p.is_file())
            elif os.path.isfile(part):
                found = [part]
            else:
                found = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not found:
                raise DataError(f"input '{part}' matches no file; expected a file, a folder or a glob")
            paths.extend(found)
    return paths


def is_jsonl(path: str, input_format: str) -> bool:
    if input_format != "auto":
        return input_format == "jsonl"
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSONL_SUFFIXES


def open_binary(path: str) -> BinaryIO:
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        return io.BufferedReader(ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb")


class ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a (multi-frame) .zst file. Unlike zstandard's stream_reader, a file that ends
    inside a frame (an interrupted download) is an error rather than silently shorter data."""

    def __init__(self, path: str):
        import zstandard
        self._path = path
        self._raw = open(path, "rb")
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._in_frame = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError(f"{self._path} ends in the middle of a zstd frame (truncated)")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._frame.decompress(chunk)
                chunk = b""
                if self._frame.eof:
                    chunk, self._frame, self._in_frame = self._frame.unused_data, self._new_frame(), False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def read_errors() -> Tuple[type, ...]:
    """Exceptions that mean an unreadable or corrupt (possibly compressed) input file."""
    errors: Tuple[type, ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def read_items(path: str, jsonl: bool, split_lines: bool) -> Iterator[Item]:
    yielded = False
    try:
        with open_binary(path) as fh:
            if jsonl or split_lines:
                for line_no, line in enumerate(fh, start=1):
                    if line.strip():
                        yielded = True
                        yield path, line_no, line, jsonl
            else:
                content = fh.read()
                if content.strip():
                    yielded = True
                    yield path, 0, content, False
    except read_errors() as e:
        raise DataError(f"cannot read '{path}': {e}") from None
    if not yielded:
        raise DataError(f"input file '{path}' is empty; expected "
                        f"{'JSON lines' if jsonl else 'text'} with at least one document")



def item_text(item: Item, json_key: str) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, what is wrong with the item)."""
    path, line_no, raw, jsonl = item
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    if not jsonl:
        return decoded.rstrip("\n") if line_no else decoded, None
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if json_key not in obj:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        return None, f"JSON object has no key '{json_key}' (keys: {keys}); choose the key with --json-key"
    text = obj[json_key]
    if not isinstance(text, str):
        return None, f"value of '{json_key}' is {type(text).__name__}, expected a string"
    return text, None

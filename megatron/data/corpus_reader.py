"""Reading raw documents: jsonl (optionally .gz/.zst) and plain text, with file:line for every item.

Items carry the undecoded bytes so that decoding and JSON parsing can happen in worker processes.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple

from megatron.data.errors import DataError

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
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


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
    except (OSError, EOFError) as e:  # includes gzip/zstd corruption
        raise DataError(f"cannot read '{path}': {e}") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"cannot read '{path}': {e}") from None
        raise
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

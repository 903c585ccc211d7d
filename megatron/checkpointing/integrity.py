"""Checkpoint integrity: the size and checksum of every file, fsync before publishing, checks on load.

Every file of a checkpoint is written through :func:`write_shard` / :func:`write_text`, which hash the
bytes while they are written (no second read) and fsync the file. The manifest records
``files: {name: {"size": bytes, "checksum": "xxh3_64:<hex>"}}``; :func:`load_shard` checks the size
and checksum of a file before ``torch.load`` and turns every problem (missing, truncated, corrupt,
unreadable) into one :class:`CheckpointError` line naming the file.

The checksum is xxHash's xxh3_64 (about 10 GB/s, ~4% of a 200 MB save, see bench/RESULTS.md); where
the ``xxhash`` package is missing, zlib's crc32 (about 2 GB/s). The algorithm is part of each
recorded value, so either one verifies anywhere the package is installed.

The manifest and the per-shard meta files also carry a checksum of their own content (key
``checksum``, over a canonical form), checked on every load: a changed value that leaves the JSON
valid (an iteration, a consumed-sample count, a config value) is one error naming the file.

Older checkpoints still load, with a note: without ``files`` in the manifest (before file checksums),
or with a manifest of format version < 3 (before manifests carried their own checksum).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron.errors import CheckpointError

CHUNK = 8 << 20
Digest = Dict[str, Dict[str, Any]]  # file name -> {"size": int, "checksum": "algo:hex"}


class _Crc32:
    name = "crc32"

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _Xxh3:
    name = "xxh3_64"

    def __init__(self):
        import xxhash

        self._h = xxhash.xxh3_64()
        self.update = self._h.update

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def new_hasher(algorithm: Optional[str] = None):
    """A streaming hasher: ``algorithm`` (``xxh3_64`` or ``crc32``), default the fastest available."""
    if algorithm in (None, "xxh3_64"):
        try:
            return _Xxh3()
        except ImportError:
            if algorithm == "xxh3_64":
                raise CheckpointError("this checkpoint's checksums are xxh3_64; install the 'xxhash' "
                                      "package to verify them") from None
    if algorithm in (None, "crc32"):
        return _Crc32()
    raise CheckpointError(f"unknown checksum algorithm '{algorithm}'; expected xxh3_64 or crc32")


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it (for torch.save).
    A large chunk is hashed on a helper thread while it is being written (both release the GIL), and
    the hash is finished before ``write`` returns, so the caller may reuse its buffer."""

    PARALLEL_MIN = 1 << 20

    def __init__(self, raw, hasher):
        self.raw, self.hasher, self.size = raw, hasher, 0
        self._pool = None
        self.error: Optional[OSError] = None  # a failed write (disk full), which torch.save re-wraps

    def write(self, data) -> int:
        try:
            return self._write(data)
        except OSError as e:
            self.error = e
            raise

    def _write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        if n < self.PARALLEL_MIN:
            self.hasher.update(data)
            return self.raw.write(data)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
        hashing = self._pool.submit(self.hasher.update, data)
        written = self.raw.write(data)
        hashing.result()
        return written

    def flush(self) -> None:
        self.raw.flush()

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def checksum(self) -> str:
        return f"{self.hasher.name}:{self.hasher.hexdigest()}"


def write_shard(obj: Any, path: Path) -> Digest:
    """``torch.save`` to ``path``, hashed on the way and fsynced; returns its digest entry. A failed
    write raises its own OSError (ENOSPC, ...), not the error torch.save makes of it."""
    with open(path, "wb") as raw:
        writer = HashingWriter(raw, new_hasher())
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
        finally:
            writer.close_pool()
        raw.flush()
        os.fsync(raw.fileno())
    return {path.name: {"size": writer.size, "checksum": writer.checksum()}}


def atomic_write_text(path: Path, text: str) -> bytes:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename; returns the bytes."""
    data = text.encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written copy either
        raise
    return data


def write_text(path: Path, text: str) -> Digest:
    """Atomic, fsynced text file; returns its digest entry."""
    data = atomic_write_text(path, text)
    hasher = new_hasher()
    hasher.update(data)
    return {path.name: {"size": len(data), "checksum": f"{hasher.name}:{hasher.hexdigest()}"}}


# ----------------------------------------------------------------------------- self-checksummed JSON
SELF_CHECKSUM = "checksum"  # key of a JSON file's checksum of its own content (without this key)


def _content_checksum(doc: Dict[str, Any], algorithm: Optional[str] = None) -> str:
    """Checksum of ``doc`` without its own checksum, over a canonical form (sorted keys, no spaces),
    so re-indenting the file does not change it but any changed value does."""
    body = {k: v for k, v in doc.items() if k != SELF_CHECKSUM}
    hasher = new_hasher(algorithm)
    hasher.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return f"{hasher.name}:{hasher.hexdigest()}"


def signed_json(doc: Dict[str, Any], indent: Optional[int] = None) -> str:
    """``doc`` as JSON text that carries its own checksum (an older one is replaced)."""
    body = json.loads(json.dumps({k: v for k, v in doc.items() if k != SELF_CHECKSUM}, default=str))
    return json.dumps({**body, SELF_CHECKSUM: _content_checksum(body)}, indent=indent)


def write_signed_json(path: Path, doc: Dict[str, Any], indent: Optional[int] = None) -> Digest:
    """Atomic, fsynced JSON file carrying its own checksum; returns its digest entry."""
    return write_text(path, signed_json(doc, indent))


def check_signed_json(doc: Dict[str, Any], path: Path, required: bool) -> bool:
    """Verify the checksum ``doc`` (read from ``path``) carries of itself: one CheckpointError line
    when it differs, or when it is ``required`` and absent. False: absent (a file from before)."""
    recorded = doc.get(SELF_CHECKSUM)
    if recorded is None:
        if required:
            raise CheckpointError(f"'{path}' lacks its '{SELF_CHECKSUM}' entry, which this checkpoint format "
                                  "writes: corrupted or edited")
        return False
    algorithm = str(recorded).partition(":")[0]
    if algorithm not in ("xxh3_64", "crc32") or _content_checksum(doc, algorithm) != recorded:
        raise CheckpointError(f"'{path}' fails its own {algorithm} checksum: its content was changed after it "
                              "was written (corrupted or edited)")
    return True


def file_digest(path: Path, algorithm: Optional[str] = None) -> Digest:
    """Digest entry of an existing file (read in chunks)."""
    hasher = new_hasher(algorithm)
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
    return {path.name: {"size": size, "checksum": f"{hasher.name}:{hasher.hexdigest()}"}}


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new files, renames) on POSIX; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- verification
_NOTED: set = set()


# 3: the manifest and the meta files carry a checksum of their own content (2: optimizer shards keyed
# by parameter name; 1: torch's numbered optimizer state dict, decayed parameters first).
FORMAT_VERSION = 3
SIGNED_SINCE = 3


def _note_unverified(ckpt: Path, what: str) -> None:
    if (str(ckpt), what) in _NOTED:
        return
    _NOTED.add((str(ckpt), what))
    if int(os.environ.get("RANK", "0")) == 0:  # stdout: information, not an error
        print(f"note: checkpoint '{ckpt}' predates {what}", flush=True)


def signed_format(manifest: Dict[str, Any]) -> bool:
    """Whether this checkpoint's manifest and meta files must carry their own checksums."""
    version = manifest.get("format_version", 1)
    return isinstance(version, int) and version >= SIGNED_SINCE


def read_manifest_file(ckpt: Path) -> Dict[str, Any]:
    """The manifest as a dict, verified against its own checksum, or one CheckpointError line
    (missing, not JSON, changed after it was written, missing keys). A manifest from before
    manifests carried checksums loads with a note."""
    path = ckpt / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{ckpt}' has no manifest.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"manifest '{path}' is unreadable or not valid JSON ({e}): the checkpoint "
                              "is incomplete or corrupted") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"manifest '{path}' is not a JSON object: corrupted")
    if not check_signed_json(manifest, path, required=signed_format(manifest)):
        _note_unverified(ckpt, "manifest checksums; its manifest is used without verification")
    for key in ("iteration", "layout"):
        if key not in manifest:
            raise CheckpointError(f"manifest '{path}' lacks '{key}': corrupted or not written by this trainer")
    return manifest


def _record_for(path: Path, manifest: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The manifest's record of ``path`` after existence and size checks; None when unrecorded (old)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path.parent}' is missing file {path.name}")
    files = manifest.get("files")
    if files is None:
        _note_unverified(path.parent, "checksums; its files are loaded without verification")
        return None
    record = files.get(path.name)
    if record is None:
        raise CheckpointError(f"file '{path}' is not listed in the checkpoint's manifest: it does not belong "
                              "to this checkpoint")
    size = path.stat().st_size
    if size != record["size"]:
        raise CheckpointError(f"file '{path}' is {size} bytes but the manifest records {record['size']}: "
                              f"{'truncated' if size < record['size'] else 'overwritten'}")
    return record


def _check_checksum(path: Path, record: Dict[str, Any]) -> None:
    algorithm, _, want = record["checksum"].partition(":")
    got = file_digest(path, algorithm)[path.name]["checksum"].partition(":")[2]
    if got != want:
        raise CheckpointError(f"file '{path}' fails its {algorithm} checksum ({got} != {want} recorded): "
                              "corrupted")


def verify_file(path: Path, manifest: Dict[str, Any]) -> None:
    """Size and checksum of ``path`` against the manifest's record (a note when there is none)."""
    record = _record_for(path, manifest)
    if record is not None:
        _check_checksum(path, record)


def load_shard(path: Path, weights_only: bool = True, manifest: Optional[Dict[str, Any]] = None) -> Any:
    """``torch.load`` a checkpoint file (CPU), verified against its manifest: the checksum is computed
    on a helper thread while the file loads (both release the GIL) and checked before returning."""
    path = Path(path)
    if manifest is None:
        manifest = read_manifest_file(path.parent)
    record = _record_for(path, manifest)
    checking = None
    if record is not None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-verify")
        checking = pool.submit(_check_checksum, path, record)
        pool.shutdown(wait=False)
    try:
        value = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a corrupt file: its checksum error is the clearer message
        if checking is not None:
            checking.result()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"file '{path}' could not be read ({first}): truncated or corrupted") from None
    if checking is not None:
        checking.result()
    return value


def read_json_file(path: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """A verified JSON file of a checkpoint (per-shard metadata): its size and checksum as the
    manifest records them, and the checksum it carries of itself."""
    verify_file(path, manifest)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"file '{path}' is not valid JSON ({e}): corrupted") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"file '{path}' is not a JSON object: corrupted")
    check_signed_json(doc, path, required=signed_format(manifest))
    return doc

"""Tokenizing documents into an indexed dataset, in order, with N worker processes (tools/preprocess_data.py).

The main process reads raw items and writes the output; workers decode, parse JSON and tokenize. Results
are consumed in submission order, so the output is identical for any worker count.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from megatron.data.corpus_reader import Item, expand_inputs, is_jsonl, item_text, read_items
from megatron.errors import DataError
from megatron.progress import Progress
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype, check_vocab_fits
from megatron.tokenizer import Tokenizer, build_tokenizer

BATCH_BYTES = 1 << 20
BATCH_ITEMS = 512
DTYPES = {"uint16": np.uint16, "int32": np.int32, "int64": np.int64}


def batches(paths: List[str], input_format: str, split_lines: bool) -> Iterator[List[Item]]:
    batch: List[Item] = []
    size = 0
    for path in paths:
        for item in read_items(path, is_jsonl(path, input_format), split_lines):
            batch.append(item)
            size += len(item[2])
            if size >= BATCH_BYTES or len(batch) >= BATCH_ITEMS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- tokenizing (workers)
_worker_state: dict = {}


def init_worker(tokenizer_type: str, vocab_file: str, merge_file: Optional[str], json_key: str,
                append_eod: bool, dtype_name: str, fix_text: bool = False, in_pool: bool = False) -> None:
    if in_pool:  # the main process handles stop signals and ends the pool in order; workers ignore
        # them, also when a scheduler or a terminal signals every process of the job at once
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    _worker_state.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod,
                         dtype=np.dtype(dtype_name), fix_text=fix_text)


def tokenize_batch(batch: List[Item]) -> List[Tuple[str, int, Optional[bytes], Optional[str]]]:
    """Per item: (path, line, token bytes or None, error or None). Empty texts give b"" (skipped)."""
    st = _worker_state
    tokenizer: Tokenizer = st["tokenizer"]
    texts, keep, out = [], [], []
    for item in batch:
        text, error = item_text(item, st["json_key"])
        out.append([item[0], item[1], None, error])
        if text is not None and st["fix_text"]:
            import ftfy

            text = ftfy.fix_text(text)
        if text is not None:
            if text.strip():
                texts.append(text)
                keep.append(len(out) - 1)
            else:
                out[-1][2] = b""
    for slot, ids in zip(keep, tokenizer.encode_batch(texts)):
        if st["append_eod"]:
            ids = list(ids) + [tokenizer.eod_id]
        out[slot][2] = np.asarray(ids, dtype=st["dtype"]).tobytes()
    return [tuple(o) for o in out]


# ----------------------------------------------------------------------------- main loop
@dataclass
class PreprocessOptions:
    input: List[str]
    output_prefix: str
    vocab_file: Optional[str] = None
    tokenizer_type: str = "HFTokenizer"
    merge_file: Optional[str] = None
    json_key: str = "text"
    input_format: str = "auto"
    split_lines: bool = False
    append_eod: bool = True
    dtype: str = "auto"
    workers: int = 1
    skip_bad_lines: bool = False
    quiet: bool = False
    num_docs: Optional[int] = None  # the progress total in documents (NeoX's --num-docs); else input bytes
    log_interval: Optional[int] = None  # documents between progress lines, at most (NeoX's --log-interval)
    ftfy: bool = False  # fix broken unicode with ftfy before tokenizing

    @property
    def output_dataset(self) -> str:
        return f"{self.output_prefix}_{self.json_key}_document"


@dataclass
class PreprocessStats:
    output: str = ""
    dtype: str = ""
    docs: int = 0
    tokens: int = 0
    bad_lines: int = 0
    empty_docs: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def docs_per_s(self) -> float:
        return self.docs / max(self.seconds, 1e-9)


def location(path: str, line_no: int) -> str:
    return f"{path}:{line_no}" if line_no else path


def batch_bytes(batch: List[Item]) -> int:
    return sum(len(item[2]) + 1 for item in batch)  # + the line's newline


def results_in_order(workers: int, all_batches: Iterator[List[Item]], init_args: tuple) -> Iterator[tuple]:
    """(input bytes, results) per batch, in input order."""
    if workers <= 1:
        init_worker(*init_args)
        for batch in all_batches:
            yield batch_bytes(batch), tokenize_batch(batch)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # A process pool that notices a worker's death (an out-of-memory kill is SIGKILL): the pending
    # results fail with BrokenProcessPool instead of waiting forever, as multiprocessing.Pool would.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=init_worker,
                               initargs=(*init_args, True))
    try:
        pending: deque = deque()
        for batch in all_batches:
            pending.append((batch_bytes(batch), pool.submit(tokenize_batch, batch)))
            if len(pending) >= 2 * workers:
                size, result = pending.popleft()
                yield size, result.result()
        while pending:
            size, result = pending.popleft()
            yield size, result.result()
    except BrokenProcessPool:
        raise DataError(f"a tokenizer worker process died ({dead_worker_cause(pool)}); nothing written. "
                        "If it ran out of memory, use fewer --workers or smaller input files") from None
    finally:
        stop_pool(pool)


def dead_worker_cause(pool, wait_s: float = 2.0) -> str:
    """How the worker died. The pool can report the death (its pipe closed) a moment before the kernel
    has the exit status, so wait up to ``wait_s`` for one; a SIGTERM is likely the pool ending the
    survivors, so another signal comes first."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    deadline = time.monotonic() + wait_s
    while not (codes := [p.exitcode for p in processes if p.exitcode]) and time.monotonic() < deadline:
        time.sleep(0.02)
    signals = sorted((-c for c in codes if c < 0), key=lambda s: s == signal.SIGTERM)
    if signals:
        return f"killed by signal {signals[0]}{', as the out-of-memory killer does' if signals[0] == 9 else ''}"
    return f"exit code {codes[0]}" if codes else "killed"


def stop_pool(pool) -> None:
    """End the pool. Intact, it is shut down in order: pending batches cancelled, the few being
    tokenized let finish (well under a second), the manager thread joined. Killing the workers
    instead can leave the pool's feeder thread blocked forever sending a batch into a pipe nobody
    reads (the exit then waits for it: CPython gh-107219, fixed on Windows only), and a pool left
    running races concurrent.futures' exit hook (a "Bad file descriptor" traceback). A pool whose
    worker died (broken) has stopped its work already: its other workers are ended now."""
    if not getattr(pool, "_broken", False):
        pool.shutdown(wait=True, cancel_futures=True)
        return
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.kill()  # workers ignore SIGTERM
    for p in processes:
        p.join(timeout=5)


def write_results(results: list, builder: IndexedDatasetBuilder, stats: PreprocessStats, skip_bad_lines: bool,
                  dtype: np.dtype) -> None:
    for path, line_no, payload, error in results:
        if error is not None:
            if not skip_bad_lines:
                raise DataError(f"{location(path, line_no)}: {error} (use --skip-bad-lines to skip such lines)")
            stats.bad_lines += 1
            if stats.bad_lines <= 5:
                print(f"skipped {location(path, line_no)}: {error}", file=sys.stderr)
        elif not payload:
            stats.empty_docs += 1
        else:
            tokens = np.frombuffer(payload, dtype=dtype)
            builder.add_document(tokens)
            stats.docs += 1
            stats.tokens += len(tokens)


def make_progress(opts: PreprocessOptions, paths: List[str]) -> Progress:
    """Documents against --num-docs when given, else bytes against the input files' size (known
    when none is compressed: a compressed file's text is larger than the file)."""
    if opts.num_docs:
        return Progress("tokenizing", total=opts.num_docs, unit="docs", enabled=not opts.quiet,
                        every=opts.log_interval)
    compressed = any(Path(p).suffix in (".gz", ".zst", ".xz", ".bz2") for p in paths)
    total = None if compressed else sum(os.path.getsize(p) for p in paths)
    return Progress("tokenizing", total=total, unit="B", enabled=not opts.quiet)


class Stopped(Exception):
    """A stop signal arrived; preprocessing stopped between two batches and wrote nothing."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def preprocess(opts: PreprocessOptions, stop_signal: Callable[[], int] = lambda: 0) -> PreprocessStats:
    """Tokenize ``opts.input`` into ``opts.output_dataset``.bin/.idx; DataError on bad input.
    ``stop_signal()`` (non-zero: the signal received) is polled between batches: the caller's signal
    handler only notes the signal, and :class:`Stopped` is raised here, where unwinding is safe (not
    inside the worker pool's machinery or a fork); the temporary files are removed."""
    # Workers tokenize single-threaded: HF's own thread pool would fight the worker processes for cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.workers < 1:
        raise DataError(f"--workers must be at least 1, got {opts.workers}")
    paths = expand_inputs(opts.input)
    tokenizer = build_tokenizer(opts.tokenizer_type, opts.vocab_file, opts.merge_file)
    dtype = np.dtype(best_fitting_dtype(tokenizer.vocab_size) if opts.dtype == "auto" else DTYPES[opts.dtype])
    check_vocab_fits(tokenizer.vocab_size, dtype)
    init_args = (opts.tokenizer_type, opts.vocab_file, opts.merge_file, opts.json_key, opts.append_eod, dtype.name,
                 opts.ftfy)
    stats = PreprocessStats(output=opts.output_dataset, dtype=dtype.name)
    start = time.perf_counter()
    progress = make_progress(opts, paths)
    with IndexedDatasetBuilder(opts.output_dataset, dtype) as builder:
        ordered = results_in_order(opts.workers, batches(paths, opts.input_format, opts.split_lines),
                                   init_args)
        with closing(ordered):  # shuts the worker pool down on errors too
            for size, results in ordered:
                if stop_signal():
                    raise Stopped(stop_signal())
                docs_before = stats.docs
                write_results(results, builder, stats, opts.skip_bad_lines, dtype)
                progress.update(stats.docs - docs_before if opts.num_docs else size)
        if stats.docs == 0:
            raise DataError(f"no documents with text in {', '.join(paths[:3])}"
                            f"{' ...' if len(paths) > 3 else ''}; nothing written")
    if progress.total and not opts.num_docs:
        progress.done = progress.total  # blank lines and the last newline are not counted
    progress.close()
    stats.seconds = time.perf_counter() - start
    if not opts.quiet:
        print(f"wrote {stats.output}.bin/.idx: {stats.docs:,} documents, {stats.tokens:,} tokens, dtype "
              f"{stats.dtype} (vocab {tokenizer.vocab_size:,}, eod {tokenizer.eod_id} "
              f"{'appended' if opts.append_eod else 'not appended'})")
        print(f"skipped {stats.bad_lines:,} bad lines, {stats.empty_docs:,} empty documents; "
              f"{stats.seconds:.1f} s, {stats.docs_per_s:,.0f} docs/s, {stats.tokens_per_s:,.0f} tokens/s "
              f"with {opts.workers} worker(s)")
    return stats

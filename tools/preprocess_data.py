#!/usr/bin/env python
"""Tokenize documents into a Megatron/GPT-NeoX indexed dataset ``PREFIX_text_document.bin/.idx``.

Inputs: jsonl (one JSON object per line, text under ``--json-key``), optionally ``.gz``/``.zst``
compressed like Pile shards, or plain text files (one document per file, or per line with
``--split-lines``). Files, directories (searched recursively) and globs may be given, comma- or
space-separated. Documents are tokenized by ``--workers`` processes in input order, so the output is the
same for any worker count.

    python tools/preprocess_data.py --input data/sample/corpus.jsonl --output-prefix data/tiny/corpus \\
        --tokenizer-type HFTokenizer --vocab-file data/sample/tokenizer.json --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

# Each worker tokenizes single-threaded; HF's own thread pool would fight the worker processes for cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megatron.data.corpus_reader import Item, expand_inputs, is_jsonl, item_text, read_items  # noqa: E402
from megatron.data.errors import DataError  # noqa: E402
from megatron.data.indexed_dataset import (IndexedDatasetBuilder, best_fitting_dtype,  # noqa: E402
                                           check_vocab_fits)
from megatron.tokenizer import Tokenizer, build_tokenizer  # noqa: E402

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
                append_eod: bool, dtype_name: str) -> None:
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    _worker_state.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod,
                         dtype=np.dtype(dtype_name))


def tokenize_batch(batch: List[Item]) -> List[Tuple[str, int, Optional[bytes], Optional[str]]]:
    """Per item: (path, line, token bytes or None, error or None). Empty texts give b"" (skipped)."""
    st = _worker_state
    tokenizer: Tokenizer = st["tokenizer"]
    texts, keep, out = [], [], []
    for item in batch:
        text, error = item_text(item, st["json_key"])
        out.append([item[0], item[1], None, error])
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
class Stats:
    def __init__(self) -> None:
        self.docs = self.tokens = self.bad = self.empty = 0
        self.start = time.perf_counter()

    def rates(self) -> Tuple[float, float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, self.docs / elapsed, self.tokens / elapsed


def location(path: str, line_no: int) -> str:
    return f"{path}:{line_no}" if line_no else path


def results_in_order(args, all_batches: Iterator[List[Item]], init_args: tuple) -> Iterator[list]:
    if args.workers <= 1:
        init_worker(*init_args)
        for batch in all_batches:
            yield tokenize_batch(batch)
        return
    import multiprocessing as mp
    with mp.get_context("fork").Pool(args.workers, initializer=init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for batch in all_batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 2 * args.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(args) -> Stats:
    paths = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    dtype = best_fitting_dtype(tokenizer.vocab_size) if args.dtype == "auto" else DTYPES[args.dtype]
    check_vocab_fits(tokenizer.vocab_size, dtype)
    prefix = f"{args.output_prefix}_{args.json_key}_document"
    init_args = (args.tokenizer_type, args.vocab_file, args.merge_file, args.json_key, args.append_eod,
                 np.dtype(dtype).name)
    stats = Stats()
    progress = make_progress(args.quiet)
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for results in results_in_order(args, batches(paths, args.input_format, args.split_lines), init_args):
            for path, line_no, payload, error in results:
                if error is not None:
                    if not args.skip_bad_lines:
                        raise DataError(f"{location(path, line_no)}: {error} (use --skip-bad-lines to skip "
                                        "such lines)")
                    stats.bad += 1
                    if stats.bad <= 5:
                        print(f"skipped {location(path, line_no)}: {error}", file=sys.stderr)
                    continue
                if not payload:
                    stats.empty += 1
                    continue
                tokens = np.frombuffer(payload, dtype=dtype)
                builder.add_document(tokens)
                stats.docs += 1
                stats.tokens += len(tokens)
            if progress is not None:
                progress.update(len(results))
                progress.set_postfix_str(f"{stats.rates()[2]:,.0f} tokens/s", refresh=False)
        if stats.docs == 0:
            raise DataError(f"no documents with text in {', '.join(paths[:3])}"
                            f"{' ...' if len(paths) > 3 else ''}; nothing written")
    if progress is not None:
        progress.close()
    elapsed, docs_s, tokens_s = stats.rates()
    print(f"wrote {prefix}.bin/.idx: {stats.docs:,} documents, {stats.tokens:,} tokens, dtype "
          f"{np.dtype(dtype).name} (vocab {tokenizer.vocab_size:,}, eod {tokenizer.eod_id} "
          f"{'appended' if args.append_eod else 'not appended'})")
    print(f"skipped {stats.bad:,} bad lines, {stats.empty:,} empty documents; {elapsed:.1f} s, "
          f"{docs_s:,.0f} docs/s, {tokens_s:,.0f} tokens/s with {args.workers} worker(s)")
    return stats


def make_progress(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm
    return tqdm(unit="doc", unit_scale=True, mininterval=1.0, file=sys.stderr, desc="tokenizing")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, folders or globs (comma-separated ok)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<json-key>_document.bin/.idx")
    p.add_argument("--json-key", default="text", help="key holding the document text in jsonl input")
    p.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson (optionally .gz/.zst) are JSON lines, the rest text")
    p.add_argument("--split-lines", action="store_true", help="text input: every non-blank line is a document")
    p.add_argument("--tokenizer-type", default="HFTokenizer",
                   choices=("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"))
    p.add_argument("--vocab-file", required=True, help="tokenizer.json, sentencepiece .model or vocab.json")
    p.add_argument("--merge-file", default=None, help="merges.txt for GPT2BPETokenizer")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="token dtype; auto: uint16 when the vocabulary fits, else int32")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed lines instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        preprocess(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Summarize an indexed dataset and decode a document or a training sample.

    python tools/inspect_dataset.py data/tiny/corpus_text_document --tokenizer data/sample/tokenizer.json \\
        --top 15 --doc 3 --sample 0 --seq-length 128
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megatron.cli import cli_parser  # noqa: E402
from megatron.data import MMapIndexedDataset, build_dataset  # noqa: E402
from megatron.errors import DataError, run_cli  # noqa: E402
from megatron.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_path  # noqa: E402


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def summary(ds: MMapIndexedDataset) -> List[str]:
    starts = np.concatenate([[0], np.cumsum(ds.sizes, dtype=np.int64)])
    doc_tokens = starts[ds.doc_idx[1:]] - starts[ds.doc_idx[:-1]]
    lines = [f"dataset    {ds.prefix}",
             f"dtype      {ds.dtype}",
             f"documents  {ds.num_documents:,}",
             f"sequences  {len(ds):,}",
             f"tokens     {ds.num_tokens:,}"]
    if len(doc_tokens):
        lines.append(f"doc length min {int(np.min(doc_tokens)):,} / mean {float(np.mean(doc_tokens)):,.1f} / "
                     f"max {int(np.max(doc_tokens)):,} tokens")
    return lines


def histogram(ds: MMapIndexedDataset, top: int, tokenizer: Optional[Tokenizer]) -> List[str]:
    counts = np.zeros(0, dtype=np.int64)
    chunk = 1 << 24  # count in slices so huge datasets never need a second full copy in memory
    data = ds.token_array
    for start in range(0, len(data), chunk):
        part = np.bincount(np.asarray(data[start:start + chunk]).astype(np.int64))
        if len(part) > len(counts):
            part[:len(counts)] += counts
            counts = part
        else:
            counts[:len(part)] += part
    total = max(int(counts.sum()), 1)
    lines = [f"top {top} token ids ({np.count_nonzero(counts):,} distinct):"]
    for tid in np.argsort(-counts, kind="stable")[:top]:
        if counts[tid] == 0:
            break
        text = f"  {tokenizer.decode([int(tid)])!r}" if tokenizer else ""
        lines.append(f"  {int(tid):>8} {int(counts[tid]):>12,} {100 * counts[tid] / total:6.2f}%{text}")
    return lines


def render(tokens: np.ndarray, tokenizer: Optional[Tokenizer], max_chars: int) -> str:
    if tokenizer is None:
        return shorten(" ".join(str(int(t)) for t in tokens), max_chars)
    return shorten(tokenizer.decode([int(t) for t in tokens]), max_chars)


def main(argv: Optional[List[str]] = None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--tokenizer", help="tokenizer.json or sentencepiece .model, to show text")
    p.add_argument("--tokenizer-type", choices=("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"),
                   help="override the type guessed from --tokenizer's file name")
    p.add_argument("--merge-file", help="merges.txt for GPT2BPETokenizer")
    p.add_argument("--top", type=int, default=20, help="how many of the most frequent ids to list")
    p.add_argument("--doc", type=int, action="append", default=[], help="decode document N (repeatable)")
    p.add_argument("--sample", type=int, action="append", default=[],
                   help="decode training sample N of a GPT dataset over all documents (repeatable)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-chars", type=int, default=2000)
    args = p.parse_args(argv)
    ds = MMapIndexedDataset(args.prefix)
    tokenizer = None
    if args.tokenizer:
        tokenizer = (build_tokenizer(args.tokenizer_type, args.tokenizer, args.merge_file)
                     if args.tokenizer_type else tokenizer_from_path(args.tokenizer))
    print("\n".join(summary(ds)))
    if args.top > 0:
        print("\n".join(histogram(ds, args.top, tokenizer)))
    for doc in args.doc:
        if not 0 <= doc < ds.num_documents:
            raise DataError(f"document {doc} out of range: '{args.prefix}' has {ds.num_documents} documents")
        tokens = ds.document(doc)
        print(f"--- document {doc} ({len(tokens)} tokens)\n{render(tokens, tokenizer, args.max_chars)}")
    if args.sample:
        with tempfile.TemporaryDirectory() as cache:
            gpt = build_dataset([args.prefix], None, args.seq_length, args.seed, max(args.sample) + 1, cache)
            for n in args.sample:
                tokens = gpt[n]["text"]
                print(f"--- sample {n} (seq_length {args.seq_length}, seed {args.seed})\n"
                      f"{render(tokens, tokenizer, args.max_chars)}")
    return 0


if __name__ == "__main__":
    run_cli(main)

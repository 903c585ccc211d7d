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
import signal
import sys
from pathlib import Path
from typing import List, Optional

# Each worker tokenizes single-threaded; HF's own thread pool would fight the worker processes for cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.data.preprocess import DTYPES, PreprocessOptions, Stopped, preprocess  # noqa: E402
from megatron.errors import run_cli  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = cli_parser(__doc__)
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
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    received: List[int] = []

    def on_stop(signum, frame):
        # Only noted: preprocessing stops at its next batch, where unwinding is safe. Raising here
        # could land inside the worker pool's machinery or a fork (a lost signal, or a traceback).
        if received:
            raise KeyboardInterrupt  # a second signal: stop now (run_cli's one line)
        received.append(signum)

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        preprocess(PreprocessOptions(**vars(args)), stop_signal=lambda: received[0] if received else 0)
    except Stopped as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}; no output written", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0

if __name__ == "__main__":
    run_cli(main)

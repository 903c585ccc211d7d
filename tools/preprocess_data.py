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
from megatron.errors import DataError, run_cli  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES  # noqa: E402


def build_parser(neox: bool = False):
    """Our flags, with GPT-NeoX's spellings accepted; ``neox``: NeoX's defaults (tools/datasets/preprocess_data.py:
    --tokenizer-type required, no end-of-document token unless --append-eod)."""
    p = cli_parser(__doc__)
    p.add_argument("--input", nargs="+", required=True, help="files, folders or globs (comma-separated ok)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<json-key>_document.bin/.idx")
    p.add_argument("--json-key", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"],
                   help="key(s) holding the document text in jsonl input; one output dataset per key")
    p.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson (optionally .gz/.zst) are JSON lines, the rest text")
    p.add_argument("--split-lines", action="store_true", help="text input: every non-blank line is a document")
    p.add_argument("--tokenizer-type", required=neox, default="HFTokenizer", choices=TOKENIZER_TYPES + NEOX_ONLY)
    p.add_argument("--vocab-file", "--vocab", dest="vocab_file", default=None,
                   help="tokenizer.json, sentencepiece .model or vocab.json (CharLevelTokenizer needs none)")
    p.add_argument("--merge-file", default=None, help="merges.txt for GPT2BPETokenizer")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=not neox,
                   help="append the end-of-document token to every document (default: "
                        f"{'off, as in NeoX' if neox else 'on'})")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="token dtype; auto: uint16 when the vocabulary fits, else int32")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed lines instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    n = p.add_argument_group("GPT-NeoX's flags")
    n.add_argument("--dataset-impl", default="mmap", choices=("mmap", "lazy", "cached"),
                   help="mmap (Megatron's .bin/.idx, the only format written here)")
    n.add_argument("--num-docs", type=int, default=None,
                   help="documents in the input: the progress total (default: the input's bytes)")
    n.add_argument("--log-interval", type=int, default=None, help="documents between progress lines (at most)")
    n.add_argument("--ftfy", action="store_true", help="fix broken unicode with ftfy (pip install ftfy)")
    return p


NEOX_ONLY = ("TiktokenTokenizer",)  # accepted by the parser so the refusal can say why


def options_from_args(args: argparse.Namespace) -> List[PreprocessOptions]:
    """One PreprocessOptions per json key; NeoX flags we cannot honour are one-line errors."""
    if args.dataset_impl != "mmap":
        raise DataError(f"--dataset-impl {args.dataset_impl}: only mmap (Megatron's .bin/.idx) is written here; "
                        "NeoX trains from mmap too")
    if args.tokenizer_type in NEOX_ONLY:
        raise DataError(f"--tokenizer-type {args.tokenizer_type} is not implemented; use one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if args.ftfy:
        import importlib.util

        if importlib.util.find_spec("ftfy") is None:
            raise DataError("--ftfy needs the ftfy package (pip install ftfy)")
    for flag, value in (("--num-docs", args.num_docs), ("--log-interval", args.log_interval)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    common = {k: v for k, v in vars(args).items() if k not in ("json_keys", "dataset_impl")}
    return [PreprocessOptions(**common, json_key=key) for key in args.json_keys]


def main(argv: Optional[List[str]] = None, neox: bool = False) -> int:
    args = build_parser(neox).parse_args(argv)
    all_options = options_from_args(args)
    received: List[int] = []

    def on_stop(signum, frame):
        # Only noted: preprocessing stops at its next batch, where unwinding is safe. Raising here
        # could land inside the worker pool's machinery or a fork (a lost signal, or a traceback).
        if received:
            raise KeyboardInterrupt  # a second signal: stop now (run_cli's one line)
        received.append(signum)

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for options in all_options:
            preprocess(options, stop_signal=lambda: received[0] if received else 0)
    except Stopped as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}; no output written", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    run_cli(main)

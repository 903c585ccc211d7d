#!/usr/bin/env python
"""Streaming perplexity of a long text under one or more KV cache policies.

The text is tokenized and fed one token at a time (as the reference Streaming-SepLLM evaluator does),
or --chunk N tokens per forward: many times faster on long texts, and the same predictions as long as
the cache evicts nothing (a full-attention cache, or a text shorter than the budget) or evicts only
keys the rule hides (--decode-mask rule, see megatron/inference/engine.py). Otherwise the tokens of a
chunk may still see keys that the token-by-token stream had already evicted. Every --report-every
tokens a row is written: perplexity of the interval and so far, KV entries now and on average (vs.
full attention), KV bytes, tokens/s, RSS now and peak. Writes OUT/<policy>.csv and
OUT/streaming_ppl.png (ppl and KV size vs tokens, one line per policy).

    python tools/eval_streaming_ppl.py --load CKPT --text-file book.txt --num-tokens 20480 \\
        --policies sepllm,streamingllm --init-cache-size 4 --sep-cache-size 64 --local-size 256 \\
        --cache-size 800 --out-dir runs/streaming --chunk 64
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import InferenceError, run_cli  # noqa: E402
from megatron.inference.cli import add_cache_args, add_checkpoint_args, cache_config_from_args  # noqa: E402
from megatron.inference.kv_cache import POLICIES  # noqa: E402


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = cli_parser(__doc__)
    add_checkpoint_args(p)
    p.add_argument("--text-file", required=True, help="the long text stream (UTF-8)")
    p.add_argument("--num-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--report-every", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens per forward (default 1: token by token); capped by what one forward may add "
                        "to the cache. With eviction, a chunk's tokens may see keys the one-token stream dropped")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per policy (stops at a report)")
    p.add_argument("--policies", default=None,
                   help=f"comma-separated subset of {','.join(POLICIES)} to run one after another "
                        "(default: --policy); StreamingLLM keeps the initial tokens + the last c - a")
    p.add_argument("--out-dir", default="streaming_ppl")
    add_cache_args(p)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    policies = [x.strip() for x in (args.policies or args.policy).split(",") if x.strip()]
    configs = [cache_config_from_args(args, policy) for policy in policies]  # validated before loading
    if args.report_every < 1:
        raise InferenceError(f"--report-every must be >= 1, got {args.report_every}")
    if args.chunk < 1:
        raise InferenceError(f"--chunk must be >= 1, got {args.chunk}")
    if args.num_tokens is not None and args.num_tokens < 1:
        raise InferenceError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if not os.path.isfile(args.text_file):
        raise InferenceError(f"text file '{args.text_file}' not found")
    text = Path(args.text_file).read_text(errors="replace")
    if not text.strip():
        raise InferenceError(f"text file '{args.text_file}' is empty")
    from megatron.inference.engine import StreamingEngine
    from megatron.inference.loading import load_model, load_tokenizer
    from megatron.inference.streaming_eval import evaluate_stream, plot_reports, reset_peak_rss, write_csv

    tokenizer = load_tokenizer(args.load, args.tokenizer_type, args.vocab_file, args.merge_file)
    model, _, ckpt = load_model(args.load, tokenizer, args.device)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise InferenceError("the text encodes to fewer than 2 tokens: nothing to predict")
    series = {}
    for cfg in configs:
        reset_peak_rss()
        engine = StreamingEngine(model, cfg)
        print(f"# {cfg.policy}: a={cfg.init_cache_size} s={cfg.sep_cache_size} w={cfg.local_size} "
              f"c={cfg.cache_size} pos_shift={cfg.enable_pos_shift} decode_mask={cfg.decode_mask} chunk={args.chunk}",
              flush=True)
        print("tokens,ppl,ppl_cumulative,kv_len,kv_len_avg,full_kv_avg,tokens_per_s,rss_mb", flush=True)

        def show(r):
            print(f"{r.tokens},{r.ppl:.3f},{r.ppl_cumulative:.3f},{r.kv_len},{r.kv_len_avg:.1f},"
                  f"{r.full_kv_avg:.1f},{r.tokens_per_s:.1f},{r.rss_mb:.1f}", flush=True)

        reports = evaluate_stream(engine, ids, args.report_every, args.num_tokens, args.time_budget, show, args.chunk)
        write_csv(reports, os.path.join(args.out_dir, f"{cfg.policy}.csv"))
        series[cfg.policy] = reports
    png = os.path.join(args.out_dir, "streaming_ppl.png")
    plot_reports(series, png, f"{ckpt.name}: streaming perplexity")
    print(f"wrote {args.out_dir}/{{{','.join(series)}}}.csv and {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)

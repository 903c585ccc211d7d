#!/usr/bin/env python
"""Streaming benchmark: memory and tokens/s of one-token-at-a-time decoding over a long stream.

A tiny random-init GPT-NeoX-style model reads a random token stream (about one separator every
10 tokens) under each KV cache policy. Each policy runs in its own process (so peak RSS is its own)
until --max-tokens or its time budget; every --report-every tokens it records tokens/s of the
interval, RSS now and the peak, and KV entries held and attended on average vs full attention.

    python bench/streaming.py --max-tokens 1000000 --budgets sepllm=450,streamingllm=90,full=60

Prints a markdown table (paste into bench/RESULTS.md) and writes --out (CSV per policy + JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=1024, rotary_pct=0.25,
             gpt_j_residual=True, attention={"impl": "reference", "sepllm": {"mode": "full"}})
VOCAB = 512
SEPARATORS = list(range(10))  # 10 of 512 ids, drawn 10x more often: ~1 separator per 10 tokens


def token_stream(n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    block = 65536
    for start in range(0, n, block):
        size = min(block, n - start)
        tokens = torch.randint(10, VOCAB, (size,), generator=g)
        sep = torch.rand(size, generator=g) < 0.1
        tokens[sep] = torch.randint(0, 10, (int(sep.sum()),), generator=g)
        yield from tokens.tolist()


def run_policy(policy: str, args: argparse.Namespace) -> List[dict]:
    import torch

    from megatron.config import config_from_tree
    from megatron.inference import CacheConfig, StreamingEngine
    from megatron.inference.streaming_eval import evaluate_stream, reset_peak_rss, write_csv
    from megatron.model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(config_from_tree(MODEL), VOCAB, SEPARATORS)
    cache = CacheConfig(policy, args.a, args.s, args.w, args.c)
    engine = StreamingEngine(model, cache)
    budget = parse_budgets(args.budgets).get(policy)
    reset_peak_rss()

    def show(r) -> None:
        print(f"[{policy}] {r.tokens} tokens  {r.tokens_per_s:.0f} tok/s  kv {r.kv_len} (avg {r.kv_len_avg:.0f} vs "
              f"full {r.full_kv_avg:.0f})  rss {r.rss_mb:.0f} MiB peak {r.peak_rss_mb:.0f}", file=sys.stderr,
              flush=True)

    reports = evaluate_stream(engine, token_stream(args.max_tokens + 1), args.report_every, args.max_tokens,
                              budget, show)
    write_csv(reports, os.path.join(args.out, f"{policy}.csv"))
    return [asdict(r) for r in reports]


def parse_budgets(text: str) -> Dict[str, float]:
    return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}


def markdown(results: Dict[str, List[dict]], marks: List[int]) -> str:
    lines = ["| policy | tokens | tok/s (interval) | RSS MiB | peak RSS MiB | KV entries now | avg KV attended | "
             "avg full attention | KV kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, rows in results.items():
        picked = [r for r in rows if r["tokens"] in marks] + ([rows[-1]] if rows[-1]["tokens"] not in marks else [])
        for r in picked:
            lines.append(f"| {policy} | {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['rss_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['kv_len']} | {r['kv_len_avg']:.0f} | {r['full_kv_avg']:,.0f} | "
                         f"{100 * r['kv_len_avg'] / r['full_kv_avg']:.1f}% |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="sepllm,streamingllm,full")
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--report-every", type=int, default=10_000)
    p.add_argument("--budgets", default="sepllm=450,streamingllm=90,full=60",
                   help="seconds per policy (each stops at the first report past its budget)")
    p.add_argument("--table-only", action="store_true", help="print the table from the JSON files in --out")
    p.add_argument("--a", type=int, default=4)
    p.add_argument("--s", type=int, default=64)
    p.add_argument("--w", type=int, default=256)
    p.add_argument("--c", type=int, default=800)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/out/streaming")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        rows = run_policy(args.child, args)
        Path(args.out, f"{args.child}.json").write_text(json.dumps(rows))
        return 0
    results = {}
    for policy in args.policies.split(","):
        if not args.table_only:
            cmd = [sys.executable, __file__, "--child", policy] + [a for a in (argv or sys.argv[1:])]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        results[policy] = json.loads(Path(args.out, f"{policy}.json").read_text())
    marks = [10_000, 100_000] + [k * 100_000 for k in range(2, 11)]
    print(f"model: {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, vocab {VOCAB}; cache a{args.a} "
          f"s{args.s} w{args.w} c{args.c}; {args.threads} thread(s)")
    print(markdown(results, marks))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training throughput per parallel layout on CPU (gloo): 1 rank, DP2, TP2, PP2 (1F1B).

Every layout trains the same small Sep-Attention model on the same global batch of synthetic
tokens, one thread per rank. Reported per layout: tokens/s (global batch tokens / median step
time of the slowest rank), and the communication share = time blocked in torch.distributed
collectives and pipeline send/recv waits (a wrapper around them) / step time, averaged over ranks.
For PP the wait includes the pipeline bubble. Usage: ``python bench/parallel.py [--steps 6]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")

from distributed_helpers import SEPARATORS, install_comm_timer, model_tree, run_layout, train_layout  # noqa: E402

LAYOUTS = [("1 rank", {}, 1), ("DP2", {"dp": 2}, 2), ("TP2", {"model_parallel_size": 2}, 2),
           ("TP2 + SP", {"model_parallel_size": 2, "sequence_parallel": True}, 2),
           ("PP2 1F1B", {"pipe_parallel_size": 2}, 2)]


def bench_tree(args, layout: Dict[str, Any]) -> Dict[str, Any]:
    dp = layout.get("dp", 1)
    overrides = {k: v for k, v in layout.items() if k != "dp"}
    return model_tree(num_layers=4, hidden_size=args.hidden, num_attention_heads=4, num_kv_heads=4,
                      seq_length=args.seq, train_micro_batch_size_per_gpu=args.micro,
                      gradient_accumulation_steps=args.accum // dp, train_iters=args.steps,
                      attention={"impl": "reference",
                                 "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": args.seq // 4,
                                            "separator_ids": SEPARATORS}}, **overrides)


def summarize(name: str, results: List[Dict[str, Any]], tokens: int, warmup: int) -> Dict[str, Any]:
    per_step = [max(r["step_times"][i] for r in results) for i in range(warmup, len(results[0]["step_times"]))]
    step = statistics.median(per_step)
    shares = [sum(r["step_comm"][warmup:]) / sum(r["step_times"][warmup:]) for r in results]
    return {"layout": name, "ranks": len(results), "step_s": step, "tokens_per_s": tokens / step,
            "comm_share": sum(shares) / len(shares)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=4)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    tokens = args.micro * args.accum * args.seq
    rows = []
    for name, layout, world in LAYOUTS:
        tree = bench_tree(args, layout)
        if world == 1:
            install_comm_timer()  # no collectives run, share stays 0
            results = [train_layout(tree, args.steps)]
        else:
            results = run_layout(tree, world, steps=args.steps, timing=True)
        rows.append(summarize(name, results, tokens, args.warmup))
        print(f"{name:10s} ranks={rows[-1]['ranks']} step={rows[-1]['step_s'] * 1000:.0f} ms "
              f"tokens/s={rows[-1]['tokens_per_s']:.0f} comm={rows[-1]['comm_share'] * 100:.0f}%", flush=True)
    base = rows[0]["tokens_per_s"]
    print(f"\nmodel: 4 layers, hidden {args.hidden}, seq {args.seq}, global batch {args.micro * args.accum} "
          f"x {args.seq} = {tokens} tokens/step, fp32, {args.steps - args.warmup} timed steps; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| layout | ranks | step (ms) | tokens/s | vs 1 rank | comm share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['ranks']} | {r['step_s'] * 1000:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['comm_share'] * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

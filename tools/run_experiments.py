#!/usr/bin/env python
"""Train the same small model with each attention variant and write the comparison table.

    python tools/run_experiments.py            # real text (data/docs), ~1 hour on 2 CPU cores
    python tools/run_experiments.py --smoke --out-dir /tmp/exp   # bundled sample, tiny, ~1 minute

For every variant in ``configs/experiments/`` (full, sepllm, streamingllm, fixed_interval) this trains
``base.yml + VARIANT.yml`` through ``deepy.py`` (one process), then measures from what the run left:

* final validation perplexity and median training tokens/s (from the run's ``metrics.jsonl``);
* average keys attended per query and attention FLOPs per token, counted with the Sep-Attention rule on
  held-out sequences of the training length (exact counts, not timings);
* streaming perplexity over a held-out stream 8x the training length, token by token through the bounded
  KV cache of the matching policy (full attention keeps every key);
* accuracies on the local lm-eval tasks built from held-out text (docs_lambada: last word, docs_cloze:
  which of four sentences ends the paragraph), through eval.py's harness, each model with its own rule.

The table goes into ``bench/RESULTS.md`` between the ``experiments`` markers (``--smoke``: into
``OUT/RESULTS.md``) and the loss curves into ``bench/plots/``, all from this run's logs.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402

VARIANTS = ("full", "sepllm", "streamingllm", "fixed_interval")
TASKS = ("docs_lambada", "docs_cloze")  # local lm-eval tasks (megatron/evaluation/tasks/)
POLICY = {"full": "full", "sepllm": "sepllm", "streamingllm": "streamingllm", "fixed_interval": "sepllm"}
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"
# Overrides that make the smoke run small; everything else comes from configs/experiments/.
SMOKE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "seq_length": 128,
         "train_micro_batch_size_per_gpu": 2, "train_iters": 8, "eval_interval": 4, "eval_iters": 2,
         "log_interval": 2, "split": "90,10,0", "make_vocab_size_divisible_by": 64}


class ExperimentError(UserError):
    pass


def sh(cmd: List[str], log: Path) -> None:
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise ExperimentError(f"{' '.join(cmd[:4])} ... failed (exit {res.returncode}); see {log}:\n  "
                              + "\n  ".join(tail))


def prepare_data(args, out: Path) -> Dict[str, str]:
    """Paths of the training dataset, the held-out dataset and the tokenizer."""
    if args.smoke:
        prefix = out / "data" / "sample"
        if not Path(f"{prefix}_text_document.idx").exists():
            (out / "data").mkdir(parents=True, exist_ok=True)
            sh([sys.executable, "tools/preprocess_data.py", "--input", "data/sample/corpus.jsonl",
                "--output-prefix", str(prefix), "--vocab-file", "data/sample/tokenizer.json", "--quiet"],
               out / "data" / "preprocess.log")
        p = f"{prefix}_text_document"
        tasks = build_task_data("data/sample/corpus.jsonl", out / "data" / "eval", args.task_limit)
        return {"train": p, "heldout": p, "tokenizer": "data/sample/tokenizer.json", "tasks": tasks}
    d = Path(args.corpus_dir)
    if not Path(f"{d}/corpus_text_document.idx").exists():
        print(f"# {d} has no corpus yet: running tools/datasets/prepare_corpus.py", flush=True)
        d.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "tools/datasets/prepare_corpus.py", "--out", str(d)], d / "prepare.log")
    return {"train": f"{d}/corpus_text_document", "heldout": f"{d}/heldout_text_document",
            "tokenizer": f"{d}/tokenizer.json", "tasks": build_task_data(f"{d}/heldout.jsonl", d / "eval", 500)}


def build_task_data(source: str, out: Path, examples: int) -> str:
    """The local evaluation tasks' data (tools/datasets/build_eval_tasks.py), unless already there."""
    if not (out / "docs_cloze.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "tools/datasets/build_eval_tasks.py", "--input", source, "--out", str(out),
            "--max-examples", str(examples)], out / "build.log")
    return str(out)


def train(variant: str, args, out: Path, data: Dict[str, str]) -> Path:
    run_dir = out / variant
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    override = {"data_path": data["train"], "vocab_file": data["tokenizer"], "save": str(run_dir / "ckpt"),
                "log_dir": str(run_dir)}
    if args.smoke:
        override.update(SMOKE)
    if args.train_iters:
        override["train_iters"] = args.train_iters
        override["eval_interval"] = args.train_iters
    ov = run_dir / "override.yml"
    ov.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in override.items()))
    cfgs = [str(ROOT / "configs/experiments/base.yml"), str(ROOT / f"configs/experiments/{variant}.yml"), str(ov)]
    print(f"# training {variant}: {' '.join(os.path.relpath(c, ROOT) for c in cfgs)}", flush=True)
    sh([sys.executable, "deepy.py", "--num-procs", "1", "train.py", *cfgs], run_dir / "train.log")
    return run_dir


def training_numbers(run_dir: Path) -> Dict[str, float]:
    train, valid = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            train.append(rec)
        if "valid/loss" in rec:
            valid.append(rec)
    if not train or not valid:
        raise ExperimentError(f"{run_dir}/metrics.jsonl: no training or validation records")
    rates = [r["train/tokens_per_sec"] for r in train[1:]] or [train[0]["train/tokens_per_sec"]]
    return {"iters": train[-1]["iteration"], "final_loss": train[-1]["train/loss"],
            "valid_loss": valid[-1]["valid/loss"], "valid_ppl": math.exp(valid[-1]["valid/loss"]),
            "tokens_per_s": statistics.median(rates), "wall_s": train[-1]["time"] - train[0]["time"]}


def heldout_tokens(prefix: str, count: int):
    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDataset

    ds = MMapIndexedDataset(prefix)
    parts, have = [], 0
    for i in range(len(ds)):
        parts.append(ds[i])
        have += len(parts[-1])
        if have >= count:
            break
    if have < count:
        raise ExperimentError(f"{prefix}: held-out data has {have} tokens, {count} needed")
    return np.concatenate(parts)[:count].astype("int64")


def attention_numbers(model, cfg, tokens) -> Dict[str, float]:
    """Keys attended per query and attention FLOPs per token (forward: QK^T and PV, 2 FLOPs per MAC),
    averaged over held-out sequences of the training length, layer by layer with each layer's rule."""
    import torch

    from megatron.attention.sepllm_rule import kv_kept_per_query, separator_flags

    L = cfg.model.seq_length
    seqs = torch.as_tensor(tokens[: (len(tokens) // L) * L]).view(-1, L)
    head_dims = cfg.model.hidden_size  # all query heads together
    kept_sum, flops, full_keys = 0.0, 0.0, (L + 1) / 2
    for rule in model.rules:
        is_sep = separator_flags(seqs, rule, model.separator_ids)
        kept = float(kv_kept_per_query(is_sep, rule).double().mean())
        kept_sum += kept
        flops += 4 * head_dims * kept
    n = len(model.rules)
    return {"kv_kept": kept_sum / n, "kv_kept_frac": kept_sum / n / full_keys, "attn_flops": flops,
            "attn_flops_full": 4 * head_dims * full_keys * n}


def streaming_numbers(model, variant: str, tokens, seq_len: int, args) -> Dict[str, object]:
    from megatron.inference.engine import StreamingEngine
    from megatron.inference.kv_cache import CacheConfig
    from megatron.inference.streaming_eval import evaluate_stream

    a, s, w, c = args.cache
    cache = CacheConfig(POLICY[variant], a, s, w, c, enable_pos_shift=True)
    reports = evaluate_stream(StreamingEngine(model, cache), tokens.tolist(), report_every=seq_len)
    return {"stream_ppl": reports[-1].ppl_cumulative, "stream_ppl_first": reports[0].ppl,
            "stream_ppl_last": reports[-1].ppl, "stream_kv_avg": reports[-1].kv_len_avg,
            "stream_kv_max": max(r.kv_len for r in reports), "stream_tok_s": statistics.median(
                r.tokens_per_s for r in reports), "curve": [(r.tokens, r.ppl) for r in reports]}


def task_numbers(run_dir: Path, data: Dict[str, str], args) -> Dict[str, float]:
    """Local-task accuracies through eval.py's harness (in process), the model under its own rule."""
    from megatron.evaluation.runner import EvalSettings, quiet_lm_eval
    from megatron.evaluation.runner import evaluate as run_tasks

    quiet_lm_eval()
    settings = EvalSettings(load=str(run_dir / "ckpt"), tasks=list(TASKS), task_data=data["tasks"],
                            vocab_file=data["tokenizer"], tokenizer_type="HFTokenizer", limit=args.task_limit,
                            bootstrap_iters=0, progress=False, device="cpu")
    res = run_tasks(settings, log=lambda _: None)["results"]
    return {"lambada_acc": res["docs_lambada"]["acc,none"], "lambada_ppl": res["docs_lambada"]["perplexity,none"],
            "cloze_acc": res["docs_cloze"]["acc,none"], "cloze_acc_norm": res["docs_cloze"]["acc_norm,none"],
            "task_examples": {t: res[t]["sample_len"] for t in TASKS}}


def evaluate(variant: str, run_dir: Path, data: Dict[str, str], args) -> Dict[str, object]:
    import torch

    from megatron.inference.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(str(run_dir / "ckpt"), "HFTokenizer", data["tokenizer"])
    model, cfg, _ = load_model(str(run_dir / "ckpt"), tok)
    L = cfg.model.seq_length
    res: Dict[str, object] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "seq_length": L}
    res.update(training_numbers(run_dir))
    res["tokens_trained"] = res["iters"] * cfg.training.train_micro_batch_size_per_gpu * L
    res.update(attention_numbers(model, cfg, heldout_tokens(data["heldout"], args.rule_seqs * L)))
    print(f"# streaming {variant}: {args.stream_factor * L} tokens, policy {POLICY[variant]}", flush=True)
    res.update(streaming_numbers(model, variant, heldout_tokens(data["heldout"], args.stream_factor * L + 1), L,
                                 args))
    print(f"# local tasks {variant}: {', '.join(TASKS)}", flush=True)
    res.update(task_numbers(run_dir, data, args))
    return res


def table(results: Dict[str, Dict[str, object]], args, out: Path) -> str:
    any_r = next(iter(results.values()))
    a, s, w, c = args.cache
    cmd = "python tools/run_experiments.py" + (" --smoke" if args.smoke else "")
    lines = [
        f"Written by `{cmd}` on {datetime.date.today().isoformat()} ({platform.machine()}, "
        f"{os.cpu_count()} CPU cores, fp32). "
        f"Model: {any_r['params_m']:.1f}M parameters, sequence length {any_r['seq_length']}, "
        f"{any_r['tokens_trained']:,} training tokens per variant (same batches for every variant).",
        "",
        f"| variant | valid ppl | train loss (last) | train tokens/s | keys per query | KV kept vs full "
        f"| attention MFLOP/token (fwd) | stream ppl @{args.stream_factor}x | stream ppl, last {any_r['seq_length']} "
        f"| stream KV avg / max | docs_lambada acc / ppl | docs_cloze acc / acc_norm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        lines.append(
            f"| {v} | {r['valid_ppl']:.2f} | {r['final_loss']:.3f} | {r['tokens_per_s']:.0f} | {r['kv_kept']:.1f} "
            f"| {100 * r['kv_kept_frac']:.1f}% | {r['attn_flops'] / 1e6:.2f} | {r['stream_ppl']:.2f} "
            f"| {r['stream_ppl_last']:.2f} | {r['stream_kv_avg']:.0f} / {r['stream_kv_max']} "
            f"| {100 * r['lambada_acc']:.1f}% / {r['lambada_ppl']:.0f} "
            f"| {100 * r['cloze_acc']:.1f}% / {100 * r['cloze_acc_norm']:.1f}% |")
    lines += [
        "",
        "- valid ppl: exp of the last validation loss, each model with its own attention rule. "
        "Train loss: the last logged value. Train tokens/s: median over logging windows of the whole run.",
        f"- keys per query / KV kept / attention FLOPs: counted with each layer's rule on held-out sequences of "
        f"length {any_r['seq_length']}; full attention averages (L+1)/2 keys per query. FLOPs = 4 x hidden x keys "
        f"x layers (QK^T and PV).",
        f"- stream ppl: held-out text {args.stream_factor}x the training length, predicted token by token through "
        f"the KV cache of the variant's policy (sepllm and fixed_interval: SepLLM cache a={a} s={s} w={w} c={c}; "
        f"streamingllm: a={a} c={c}; full: every key kept), positions shifted to places in the cache; "
        f"full attention therefore runs past its trained positions.",
        f"- docs_lambada / docs_cloze: local lm-eval tasks from held-out text (tools/datasets/build_eval_tasks.py; "
        f"{any_r['task_examples']['docs_lambada']} / {any_r['task_examples']['docs_cloze']} examples), run through "
        f"eval.py's harness with each model's own rule; lambada acc = the last word is the greedy continuation, "
        f"cloze = the right one of four paragraph endings (chance 25%; acc_norm divides by length in characters).",
    ]
    return "\n".join(lines)


def plots(results, run_dirs: Dict[str, Path], plot_dir: Path) -> List[Path]:
    from plot_runs import plot, read_run

    plot_dir.mkdir(parents=True, exist_ok=True)
    loss_png = plot_dir / "experiments_loss.png"
    plot({v: read_run(str(d)) for v, d in run_dirs.items()}, str(loss_png),
         "same model, same tokens: attention variants")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for v, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, "o-", label=v, markersize=3)
    ax.axvline(next(iter(results.values()))["seq_length"], color="grey", linestyle=":", label="training length")
    ax.set_xlabel("tokens into the stream")
    ax.set_ylabel(f"perplexity per {next(iter(results.values()))['seq_length']} tokens")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("streaming perplexity on held-out text")
    fig.tight_layout()
    stream_png = plot_dir / "experiments_streaming.png"
    fig.savefig(stream_png, dpi=120)
    plt.close(fig)
    return [loss_png, stream_png]


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Experiments: attention variants on real text\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="bundled sample, tiny model, a few steps (CI)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", default=None, help="runs go here (default runs/experiments, smoke: runs/smoke)")
    p.add_argument("--corpus-dir", default="data/docs")
    p.add_argument("--train-iters", type=int, default=None, help="override train_iters of base.yml")
    p.add_argument("--stream-factor", type=int, default=8, help="stream length in training lengths")
    p.add_argument("--rule-seqs", type=int, default=16, help="held-out sequences for the KV/FLOP counts")
    p.add_argument("--cache", type=int, nargs=4, metavar=("A", "S", "W", "C"), default=None,
                   help="streaming cache: initial, separators, local window, budget (default 4 64 128 256)")
    p.add_argument("--skip-train", action="store_true", help="reuse the runs already in --out-dir")
    p.add_argument("--task-limit", type=int, default=None,
                   help="examples per local task (default: all, at most 500; smoke: 16)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ExperimentError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.cache is None:
        args.cache = (4, 16, 32, 64) if args.smoke else (4, 64, 128, 256)
    if args.smoke:
        args.rule_seqs = min(args.rule_seqs, 4)
        args.task_limit = args.task_limit or 16
    out = ROOT / (args.out_dir or ("runs/smoke" if args.smoke else "runs/experiments"))
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    run_dirs = {v: (out / v if args.skip_train else train(v, args, out, data)) for v in variants}
    results = {v: evaluate(v, d, data, args) for v, d in run_dirs.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    body = table(results, args, out)
    pngs = plots(results, run_dirs, out if args.smoke else ROOT / "bench" / "plots")
    results_md = out / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md"
    body += "\n\n" + "\n".join(f"![{p.stem}]({os.path.relpath(p, results_md.parent)})" for p in pngs)
    write_section(results_md, body)
    print(body)
    print(f"wrote {results_md} and {', '.join(str(p) for p in pngs)}")
    return 0


if __name__ == "__main__":
    run_cli(main)

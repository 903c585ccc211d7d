#!/usr/bin/env python
"""Training on GPUs through the real entry points: throughput of the Pythia-160M recipe, and parallel
layouts over NCCL against one GPU.

    python bench/train_gpu.py throughput --work /tmp/w --json t.json   # 30 steps per (seq, variant)
    python bench/train_gpu.py layouts --work /tmp/w --json l.json      # TP2/PP2/DP2/CP2 vs 1 GPU (2+ GPUs)
    python bench/train_gpu.py throughput --plan                        # CPU: data + every config dry-run

The data is made here from the repository's own text: ``data/sample/corpus.jsonl`` tokenized by
``tools/preprocess_data.py`` with the shipped ``data/sample/tokenizer.json`` (vocabulary 4096, so the
LM head is smaller than Pythia's 50k one; nothing is downloaded).

throughput: ``configs/pythia/160M.yml`` with an overlay per run: the sequence length, a micro-batch
that keeps the tokens per step fixed (``--tokens-per-step``), ``--steps`` iterations, no ZeRO
(one GPU; DeepSpeed need not be installed), no wandb, no evaluation. Variants: ``full`` (every layer
dense causal attention), ``sepllm_flex`` / ``sepllm_triton`` / ``sepllm_auto`` (SepLLM n_init 3,
n_local 64 through that attention impl). Each run is ``python train.py 160M.yml overlay.yml``; its
figures come from ``metrics.jsonl``: the last logging window's tokens/s, ms/iter and MFU (the first
window holds the compilation), and the peak device memory.

layouts: a small fp32 model (4 layers, hidden 256, dense-mask ``reference`` attention, so the check is
about the parallelism, not a kernel) trains ``--steps`` steps on one GPU (``train.py``) and under each
layout on 2 GPUs (``deepy.py --num-gpus 2``, torchrun, NCCL); every iteration's loss and grad norm
must equal the one-GPU run's within ``--tolerance`` (relative). Fewer than 2 GPUs: skipped, with the
reason in the JSON.

Results are written to ``--json`` after every run, so a run stopped at its time budget keeps what
finished. Exit status: 0 when every run that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_CONFIG = ROOT / "configs" / "pythia" / "160M.yml"
CORPUS = ROOT / "data" / "sample" / "corpus.jsonl"
TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"
VARIANTS = {  # name: (sepllm mode, attention impl)
    "full": ("full", "auto"),
    "sepllm_auto": ("sepllm", "auto"),
    "sepllm_flex": ("sepllm", "flex"),
    "sepllm_triton": ("sepllm", "triton"),
}
LAYOUTS = {  # name: overlay keys; every layout runs on 2 processes with the one-GPU global batch
    "tp2": {"model_parallel_size": 2},
    "pp2": {"pipe_parallel_size": 2},
    "dp2": {"gradient_accumulation_steps": 1},
    "cp2": {"context_parallel_size": 2},
}
LAYOUT_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=512, max_position_embeddings=512,
                    norm="layernorm", pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, activation="gelu",
                    make_vocab_size_divisible_by=128, precision="fp32",
                    attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 3, "n_local": 64}},
                    optimizer={"type": "adamw", "params": {"lr": 1.0e-3}}, clip_grad=1.0,
                    train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, seed=1234)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "layouts"])
    p.add_argument("--work", default=None, help="scratch folder: data, configs, run logs (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here (after every run)")
    p.add_argument("--plan", action="store_true",
                   help="make the data and dry-run every config (deepy.py --dry-run); trains nothing, no GPU needed")
    p.add_argument("--seqs", default="8192,2048", help="throughput: sequence lengths, in the order run")
    p.add_argument("--variants", default="full,sepllm_flex,sepllm_triton",
                   help=f"throughput: comma list of {', '.join(VARIANTS)}")
    p.add_argument("--tokens-per-step", type=int, default=65536,
                   help="throughput: micro-batch = this / seq (Pythia-160M: 32 x 2048)")
    p.add_argument("--layouts", default="tp2,pp2,dp2,cp2", help=f"layouts: comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=None, help="iterations per run (default 30 throughput, 5 layouts)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="layouts: relative loss / grad-norm difference")
    p.add_argument("--run-timeout", type=float, default=240.0, help="seconds per training run")
    p.add_argument("--smoke", action="store_true",
                   help="throughput: a 2-layer model instead of Pythia-160M; layouts: run even without GPUs "
                        "(gloo on CPU). Tests the pipeline on a CPU")
    args = p.parse_args(argv)
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.variants = args.variants.split(",")
    args.layouts = args.layouts.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS] + [x for x in args.layouts if x not in LAYOUTS]
    if unknown:
        p.error(f"unknown variant/layout {unknown}; variants: {list(VARIANTS)}, layouts: {list(LAYOUTS)}")
    args.steps = args.steps or (30 if args.what == "throughput" else 5)
    return args


def write_yaml(path: Path, tree: Dict[str, Any]) -> str:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def write_json(path: Optional[str], doc: Dict[str, Any]) -> None:
    if path:
        from megatron.checkpointing.integrity import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def make_data(work: Path) -> str:
    """The sample corpus as an indexed dataset in ``work``; returns the data prefix."""
    prefix = work / "data" / "sample"
    out = f"{prefix}_text_document"
    if not Path(out + ".idx").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(CORPUS),
                        "--output-prefix", str(prefix), "--tokenizer-type", "HFTokenizer",
                        "--vocab-file", str(TOKENIZER), "--workers", "1", "--quiet"],
                       check=True, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    return out


def child_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    return env


def common_overlay(data: str, work: Path, name: str, steps: int) -> Dict[str, Any]:
    return {"data_path": data, "vocab_file": str(TOKENIZER), "tokenizer_type": "HFTokenizer", "split": "100,0,0",
            "train_iters": steps, "lr_decay_iters": steps, "warmup": 0.1, "use_wandb": False,
            "eval_interval": 100000, "eval_iters": 0, "log_dir": str(work / "runs" / name),
            "data_cache_dir": str(work / "cache")}


def throughput_configs(args: argparse.Namespace, data: str, work: Path) -> List[Dict[str, Any]]:
    """One run per (seq, variant): the first two variants at every length first (the comparison a run cut
    short should still hold), then the others."""
    order = [(L, v) for L in args.seqs for v in args.variants[:2]] + \
            [(L, v) for L in args.seqs for v in args.variants[2:]]
    runs = []
    for L, variant in order:
        mode, impl = VARIANTS[variant]
        name = f"seq{L}_{variant}"
        micro = max(1, args.tokens_per_step // L)
        tree = {**common_overlay(data, work, name, args.steps), "seq_length": L, "max_position_embeddings": L,
                "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                "train_batch_size": micro, "zero_optimization": {"stage": 0},
                "log_interval": max(1, args.steps // 3),
                "attention": {"impl": impl, "sepllm": {"mode": mode}}}
        if args.smoke:
            tree.update(num_layers=2, hidden_size=64, num_attention_heads=4, precision="fp32",
                        checkpoint_activations=False)
        overlay = write_yaml(work / "configs" / f"{name}.yml", tree)
        runs.append({"name": name, "seq": L, "variant": variant, "micro_batch": micro,
                     "configs": [str(BASE_CONFIG), overlay], "log_dir": tree["log_dir"]})
    return runs


def layout_configs(args: argparse.Namespace, data: str, work: Path) -> List[Dict[str, Any]]:
    runs = []
    for name in ["1gpu"] + args.layouts:
        tree = {**LAYOUT_MODEL, **common_overlay(data, work, f"layout_{name}", args.steps), "log_interval": 1,
                **LAYOUTS.get(name, {})}
        cfg = write_yaml(work / "configs" / f"layout_{name}.yml", tree)
        runs.append({"name": name, "configs": [cfg], "log_dir": tree["log_dir"], "procs": 1 if name == "1gpu" else 2})
    return runs


def dry_run(configs: List[str], procs: int) -> Optional[str]:
    """deepy.py --dry-run in this process (config, layout, data and tokenizer checks); None when it passes."""
    import deepy

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = deepy.main(["--dry-run", "--num-gpus", str(procs), str(ROOT / "train.py"), *configs])
    return None if rc == 0 else (out.getvalue().strip().splitlines() or ["exit %d" % rc])[-1]


def read_metrics(log_dir: str) -> List[Dict[str, Any]]:
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"train/loss"' in line]


def train(run: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """One training run as a user starts it; exit status, wall time, the tail of its output on failure."""
    procs = run.get("procs", 1)
    cmd = ([sys.executable, str(ROOT / "deepy.py"), "--num-gpus", str(procs), str(ROOT / "train.py")]
           if procs > 1 else [sys.executable, str(ROOT / "train.py")]) + run["configs"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, output = "timeout", (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(
            errors="replace")
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "output_tail": None if rc == 0 else output[-2000:]}


def throughput(args: argparse.Namespace, work: Path, doc: Dict[str, Any]) -> bool:
    data = make_data(work)
    ok = True
    for run in throughput_configs(args, data, work):
        row: Dict[str, Any] = {k: run[k] for k in ("name", "seq", "variant", "micro_batch")}
        if args.plan:
            row["dry_run"] = dry_run(run["configs"], 1) or "ok"
            ok &= row["dry_run"] == "ok"
        else:
            row.update(train(run, args.run_timeout))
            records = read_metrics(run["log_dir"])
            if records:
                last = records[-1]
                row.update(iterations=last["iteration"], loss_first=records[0]["train/loss"],
                           loss_last=last["train/loss"], tokens_per_sec=last["train/tokens_per_sec"],
                           ms_per_iter=1000 * last["train/iter_time"], mfu=last.get("train/mfu"),
                           tflops_per_device=last["train/flops_per_sec_per_device"] / 1e12,
                           peak_memory_gib=last.get("train/peak_memory_gib"))
            ok &= row["rc"] == 0 and bool(records)
        doc["runs"].append(row)
        write_json(args.json, doc)
    return ok


def compare_to_reference(ref: List[Dict[str, Any]], got: List[Dict[str, Any]], tol: float) -> Dict[str, Any]:
    worst = 0.0
    for a, b in zip(ref, got):
        for key in ("train/loss", "train/grad_norm"):
            worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))
    same_length = len(ref) == len(got) and len(ref) > 0
    return {"worst_rel_diff": worst, "equal": same_length and worst <= tol,
            "losses": [r["train/loss"] for r in got]}


def layouts(args: argparse.Namespace, work: Path, doc: Dict[str, Any]) -> bool:
    if not args.plan:
        import torch

        gpus = torch.cuda.device_count()
        doc["gpus"] = gpus
        if gpus < 2 and not args.smoke:
            doc["skipped"] = f"{gpus} CUDA device(s): the NCCL layout checks need 2"
            write_json(args.json, doc)
            return True
    data = make_data(work)
    ok, reference = True, None
    for run in layout_configs(args, data, work):
        row: Dict[str, Any] = {"layout": run["name"], "procs": run["procs"]}
        if args.plan:
            row["dry_run"] = dry_run(run["configs"], run["procs"]) or "ok"
            ok &= row["dry_run"] == "ok"
        else:
            row.update(train(run, args.run_timeout))
            records = read_metrics(run["log_dir"])
            if run["name"] == "1gpu":
                reference = records
                row["losses"] = [r["train/loss"] for r in records]
            elif reference:
                row.update(compare_to_reference(reference, records, args.tolerance))
            ok &= row["rc"] == 0 and bool(records) and row.get("equal", True)
        doc["runs"].append(row)
        write_json(args.json, doc)
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import tempfile

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        doc: Dict[str, Any] = {"bench": f"train_{args.what}", "plan": args.plan, "steps": args.steps, "runs": []}
        if args.what == "throughput":
            doc.update(base_config=str(BASE_CONFIG.relative_to(ROOT)), tokens_per_step=args.tokens_per_step)
        ok = (throughput if args.what == "throughput" else layouts)(args, work, doc)
        write_json(args.json, doc)
        print(json.dumps(doc, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

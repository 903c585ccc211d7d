"""Item 4c of bench/realmodel.py: post-training. From the pretrained weights, continue training with
Sep-Attention (n_init 4, --n-local) and, on the same tokens in the same order, with full attention
(our Trainer, configs/finetune_example.yml as the overlay's base). The license texts but the last
HELDOUT files are the training split; held-out perplexity (windows of --seq-length tokens of the last
HELDOUT files) of the pretrained model and of each arm, under Sep-Attention and under full attention.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron.errors import InferenceError


def log(msg: str) -> None:
    print(msg, flush=True)


def training_data(work: Path, ckpt: Path, train_text: str) -> str:
    """The training split as documents, tokenized with the model's tokenizer (once)."""
    from realmodel_assets import paragraphs

    root = work / "posttrain" / "data"
    prefix = root / "licenses_text_document"
    if (root / ".complete").is_file():
        return str(prefix)
    root.mkdir(parents=True, exist_ok=True)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in paragraphs(train_text)))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"),
                          "--input", str(docs), "--output-prefix", str(root / "licenses"), "--tokenizer-type",
                          "HFTokenizer", "--vocab-file", str(ckpt / "tokenizer" / "tokenizer.json"), "--workers", "1"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise InferenceError(f"tokenizing the training split failed: {res.stderr.strip()[-500:]}")
    (root / ".complete").write_text("")
    return str(prefix)


def train_arm(args: argparse.Namespace, ckpt: Path, data: str, arm: str) -> dict:
    from realmodel import rule

    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    run = Path(args.work) / "posttrain" / arm
    attention = rule("sepllm", args.n_local) if arm == "sepllm" else {"mode": "full"}
    overlay = {"finetune": True, "load": str(ckpt), "save": str(run), "data_path": data, "split": "100,0,0",
               "train_iters": args.steps, "seq_length": args.seq_length, "train_micro_batch_size_per_gpu": 1,
               "gradient_accumulation_steps": 1, "precision": "fp32", "eval_interval": 10 ** 6, "eval_iters": 1,
               "log_interval": 1, "log_dir": None, "checkpoint_factor": 0, "warmup": 0.1,
               "optimizer": {"params": {"lr": args.lr}}, "min_lr": args.lr / 10,
               "attention": {"impl": "auto", "sepllm": attention}}
    run.mkdir(parents=True, exist_ok=True)
    (run.parent / f"{arm}.yml").write_text(yaml.safe_dump(overlay))
    cfg, _ = load_config([str(ckpt / "model.yml"), str(root / "configs" / "finetune_example.yml"),
                          str(run.parent / f"{arm}.yml")], log=lambda _: None)
    start = time.perf_counter()
    losses = Trainer(cfg, log=log).train()
    return {"arm": arm, "steps": args.steps, "seq_length": args.seq_length, "lr": args.lr,
            "train_seconds": round(time.perf_counter() - start, 1), "losses": [float(x) for x in losses],
            "checkpoint": str(run)}


def heldout_ppl(load: Path, tokenizer, windows, attention: dict) -> float:
    from realmodel import window_nll
    from realmodel_assets import model_under

    model, _ = model_under(load, tokenizer, {"impl": "auto", "sepllm": attention})
    nll = sum(window_nll(model, w, int(tokenizer.vocab_size)) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def run_posttrain(args: argparse.Namespace, ckpt: Path) -> None:
    from realmodel import append_row, read_rows, rule, text_of, tokenizer_of
    from realmodel_assets import COMMON_LICENSES

    from megatron.checkpointing import resolve_checkpoint_dir
    from megatron.errors import CheckpointError

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ("sepllm", "full") for a in arms):
        raise InferenceError(f"--arms {args.arms!r}: expected a comma-separated subset of sepllm,full")
    if args.text_file:
        raise InferenceError("posttrain splits the license texts by file; --text-file is not supported here")
    tokenizer = tokenizer_of(ckpt)
    train_files, heldout_files = COMMON_LICENSES[:-4], COMMON_LICENSES[-4:]
    heldout = tokenizer.encode(text_of(args, heldout_files))
    S = args.seq_length
    windows = [heldout[i * S:(i + 1) * S] for i in range(min(args.eval_windows, len(heldout) // S))]
    out = Path(args.results) / "posttrain.jsonl"
    rules = {"sepllm": rule("sepllm", args.n_local), "full": {"mode": "full"}}
    key = {"steps": args.steps, "seq_length": S, "n_local": args.n_local, "lr": args.lr}

    def evaluate(model_name: str, load: Path) -> None:
        done = {(r.get("model"), r.get("eval_under")) for r in read_rows(out) if r.get("kind") == "eval"}
        for under, attention in rules.items():
            if (model_name, under) in done:
                continue
            start = time.perf_counter()
            ppl = heldout_ppl(load, tokenizer, windows, attention)
            append_row(out, {"kind": "eval", "model": model_name, "eval_under": under, "ppl": ppl,
                             "heldout_tokens": sum(len(w) for w in windows), "heldout_files":
                             [Path(f.path).name for f in heldout_files], **key,
                             "seconds": round(time.perf_counter() - start, 1)})
            log(f"  {model_name:<22} under {under:<6}: held-out ppl {ppl:.3f}")

    evaluate("pretrained", ckpt)
    data = training_data(Path(args.work), ckpt, text_of(args, train_files))
    for arm in arms:
        name = f"post-trained {arm}"
        trained = {r["arm"] for r in read_rows(out) if r.get("kind") == "train"}
        if arm not in trained:
            log(f"posttrain: {arm} arm, {args.steps} steps of {S} tokens")
            append_row(out, {"kind": "train", **train_arm(args, ckpt, data, arm), **key})
        run = Path(args.work) / "posttrain" / arm
        try:
            resolve_checkpoint_dir(str(run))
        except CheckpointError:
            raise InferenceError(f"the {arm} arm left no checkpoint in {run}; delete its 'train' row in {out} "
                                 "to train it again") from None
        evaluate(name, run)

#!/usr/bin/env python
"""Context parallelism for Sep-Attention: what each rank sends, against ring attention, and what CP buys.

    python bench/context_parallel.py                                   # 8k..64k, CP2 and CP4
    python bench/context_parallel.py --seqs 8192 --cps 2 --ring-max-seq 8192 --cap-seq 0   # quick look

Real text: ``data/sample/corpus.jsonl`` tokenized by ``tools/preprocess_data.py`` (the indexed dataset
``make demo-data`` writes; made here if missing), its documents back to back with their EOD tokens; a
sequence of length L is the first L + 1 tokens. Separators: the default set, ids from the tokenizer.

1. From the plans, in one process: the density of specials (initial + separators); attention work per
   rank (keys attended, ``kv_kept_per_query``) for a contiguous and the balanced split; keys each rank
   sends per Sep-Attention layer (forward; the backward returns as many gradients): ours from the rank
   plans, our closed-form estimate, ring attention's, and a block-granular selective gather (128-token
   blocks holding any needed key: the granularity of torchtitan's ``selective_gather``).
2. Measured, gloo ranks on this machine: one rank, CP2, CP4 (ours) and ring attention (the same model
   with every layer full, which runs ring attention; ring moves the same bytes whatever the mask) on
   the same sequence. Bytes each rank sends, counted by wrapping ``torch.distributed``'s point-to-point
   and collective calls, per phase (forward, backward, gradient all-reduce) and per layer; time of the
   second step; peak memory of the first step (peak RSS minus RSS before it).
3. A memory cap (``--cap-gb`` of memory above each rank's RSS before the step, enforced with
   RLIMIT_DATA): at ``--cap-seq`` one rank runs out of memory where CP2 and CP4 do not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

DATA_PREFIX = ROOT / "data" / "tiny" / "corpus_text_document"
TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"
BLOCK = 128  # selective-gather granularity (tokens per block)
FP32 = 4


# ------------------------------------------------------------------------------------------ data
def real_text_tokens(min_tokens: int) -> torch.Tensor:
    """The tokenized sample corpus as one stream (documents back to back, EOD after each)."""
    from megatron.data.indexed_dataset import MMapIndexedDataset, exists

    if not exists(str(DATA_PREFIX)):
        subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
                        str(ROOT / "data" / "sample" / "corpus.jsonl"), "--output-prefix",
                        str(DATA_PREFIX.parent / "corpus"), "--tokenizer-type", "HFTokenizer", "--vocab-file",
                        str(TOKENIZER), "--workers", "1"], check=True, capture_output=True)
    stream = torch.from_numpy(MMapIndexedDataset(str(DATA_PREFIX)).token_array.astype("int64"))
    if stream.numel() < min_tokens:
        raise SystemExit(f"the sample corpus has {stream.numel()} tokens, fewer than the {min_tokens} needed")
    return stream


def tokenizer_ids():
    from megatron.config.schema import SepLLMConfig
    from megatron.tokenizer import build_tokenizer, padded_vocab_size

    tok = build_tokenizer("HFTokenizer", str(TOKENIZER), None)
    sep = SepLLMConfig()
    return (tok.separator_ids(sep.separator_tokens, sep.include_space_prefixed), tok.eod_id,
            padded_vocab_size(tok.vocab_size, 128, 1))


def model_tree(args, seq: int, mode: str, cp: int) -> Dict[str, Any]:
    return dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                num_kv_heads=args.kv_heads, seq_length=seq, max_position_embeddings=seq,
                context_parallel_size=cp, train_micro_batch_size_per_gpu=1, seed=3,
                attention={"impl": "compact", "sepllm": {"mode": mode, "n_init": args.n_init,
                                                         "n_local": args.n_local}})


# ----------------------------------------------------------------------------- 1. from the plans
def plan_figures(args, tokens: torch.Tensor, seq: int, cp: int, sep_ids: List[int]) -> Dict[str, Any]:
    """Per-rank work and keys sent per Sep-Attention layer, from the plans (B = 1)."""
    from megatron.attention import SepRule, kv_kept_per_query, separator_flags
    from megatron.attention.compact import special_flags
    from megatron.attention.context_parallel import (
        build_rank_plans,
        needed_positions,
        owner_maps,
        sequence_segments,
    )

    rule = SepRule("sepllm", args.n_init, args.n_local)
    ids = tokens[None, :seq]
    is_sep = separator_flags(ids, rule, torch.tensor(sep_ids))
    special = special_flags(is_sep, rule)
    density = float(special.float().mean())
    kept = kv_kept_per_query(is_sep, rule)[0].double()
    work = {}
    for name, balanced in (("contiguous", False), ("balanced", True)):
        per_rank = [sum(float(kept[a:b].sum()) for a, b in sequence_segments(seq, cp, r, balanced)) for r in range(cp)]
        work[name] = max(per_rank) / statistics.mean(per_rank)
    plans = build_rank_plans(is_sep, rule, None, cp)
    ours = [p.sent_keys() for p in plans]
    ours_back = [p.received_keys() for p in plans]
    s, w = seq // (2 * cp), args.n_local
    halos = [int(r < cp - 1) + int(r >= 1) for r in range(cp)]
    closed = [density * s * (cp - 1 + r) + (w - 1) * halos[r] for r in range(cp)]
    owner, _ = owner_maps(seq, cp)
    block_owner = owner.view(-1, BLOCK)[:, 0]  # segments are whole blocks at these lengths
    blocks = [0] * cp
    for d in range(cp):  # 128-token blocks holding a key some query of rank d needs, sent by their owner
        need = needed_positions(special, sequence_segments(seq, cp, d), w - 1)[0] & (owner != d)
        needed = need.view(-1, BLOCK).any(dim=1)
        for r in range(cp):
            blocks[r] += int((needed & (block_owner == r)).sum()) * BLOCK
    ring = (cp - 1) * seq // cp
    return {"density": density, "work_max_over_mean": work, "ours_keys": ours, "ours_back_keys": ours_back,
            "closed_keys": closed, "ring_keys": ring, "block_keys": blocks}


# -------------------------------------------------------------------------- 2. measured (workers)
_COUNT: Dict[str, float] = {}
_PHASE = ["setup"]


def _install_byte_counters() -> None:
    """Wrap torch.distributed's sends and collectives: bytes this rank sends, per phase and kind."""
    import torch.distributed as dist

    def counted(name, fn, bytes_of):
        def wrapper(*a, **kw):
            tensor = kw.get("tensor", a[0] if a else None)
            if torch.is_tensor(tensor):
                key = f"{_PHASE[0]}/{name}"
                _COUNT[key] = _COUNT.get(key, 0) + bytes_of(tensor)
            return fn(*a, **kw)
        return wrapper

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    for name in ("isend", "send", "broadcast", "all_reduce"):  # all_reduce: payload (a ring sends ~2x)
        setattr(dist, name, counted(name, getattr(dist, name), size))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, world: int, port: int, out_dir: str, job: Dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron.config import config_from_tree
    from megatron.model import build_model, micro_batch_loss
    from megatron.parallel import layout_from_config
    from megatron.parallel.data_parallel import allreduce_gradients

    _install_byte_counters()
    if world > 1:
        from datetime import timedelta
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=job["timeout"]))
    cfg = config_from_tree(job["tree"], log=lambda *_: None)
    layout = layout_from_config(cfg, world, rank, groups=world > 1)
    model = build_model(cfg, job["vocab"], job["sep_ids"], job["eod"], layout)
    model.train()
    batch = torch.load(job["tokens"])
    params = [p for p in model.parameters()]
    out: Dict[str, Any] = {"rank": rank, "steps": []}
    for step in range(job["steps"]):
        model.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        _COUNT.clear()
        rss0 = _rss()
        if step == 0 and job.get("cap_bytes"):
            resource.setrlimit(resource.RLIMIT_DATA, (_data_bytes() + job["cap_bytes"], resource.RLIM_INFINITY))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            _PHASE[0] = "forward"
            loss = micro_batch_loss(model, batch)
            _PHASE[0] = "backward"
            loss.backward()
            _PHASE[0] = "grad_sync"
            allreduce_gradients(params, layout)
        except RuntimeError as err:
            if "can't allocate memory" not in str(err):
                raise
            out["oom"] = True
            break
        finally:
            _PHASE[0] = "setup"
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        out["steps"].append({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak,
                             "loss": float(loss.detach()), "bytes": dict(_COUNT)})
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    if world > 1 and not out.get("oom"):
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(job: Dict[str, Any], world: int) -> List[Dict[str, Any]]:
    """Spawn ``world`` ranks for ``job``; a rank that ran out of memory reports it (its peers, blocked
    in a message to it, are stopped)."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_helpers import free_port

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, free_port(), out, job), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.time() + job["timeout"]
        while not ctx.join(timeout=5):
            done = [r for r in range(world) if (Path(out) / f"rank{r}.pt").exists()]
            oom = any(torch.load(Path(out) / f"rank{r}.pt").get("oom") for r in done)
            if oom or time.time() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                break
        results = []
        for r in range(world):
            path = Path(out) / f"rank{r}.pt"
            results.append(torch.load(path) if path.exists() else {"rank": r, "steps": [], "oom": "stopped"})
        return results


def summarize(results: List[Dict[str, Any]], layers: int) -> Dict[str, Any]:
    if any(r.get("oom") for r in results) or not all(r["steps"] for r in results):
        return {"oom": True}
    last = [r["steps"][-1] for r in results]
    first = [r["steps"][0] for r in results]

    def per_rank(phase: str) -> List[float]:
        return [sum(v for k, v in s["bytes"].items() if k.startswith(phase + "/isend")) for s in last]

    # Each rank's loss is the mean over its chunk (equal sizes): their mean is the sequence's.
    return {"loss": statistics.mean(s["loss"] for s in last), "seconds": max(s["seconds"] for s in last),
            "cpu_max": max(s["cpu_seconds"] for s in last), "cpu_sum": sum(s["cpu_seconds"] for s in last),
            "peak_bytes": max(s["peak_bytes"] for s in first),
            "fwd_layer_bytes": [b / layers for b in per_rank("forward")],
            "bwd_layer_bytes": [b / layers for b in per_rank("backward")],
            "grad_sync_bytes": max(sum(v for k, v in s["bytes"].items() if k.startswith("grad_sync")) for s in last),
            "tokens_bytes": max(sum(v for k, v in s["bytes"].items() if k.startswith("forward/broadcast"))
                                for s in last)}


def measure(args, job_base: Dict[str, Any], seq: int, mode: str, cp: int, cap: Optional[int] = None):
    job = dict(job_base, tree=model_tree(args, seq, mode, cp), steps=1 if cap else args.steps, cap_bytes=cap)
    return summarize(run_ranks(job, cp), args.layers)


# -------------------------------------------------------------------------------------- report
def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="8192,16384,32768,65536")
    p.add_argument("--cps", default="2,4")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--n-local", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="steps per run: the first for memory, the last for time")
    p.add_argument("--ring-max-seq", type=int, default=16384, help="measure ring attention up to this length")
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap per rank (default: from the runs)")
    p.add_argument("--cap-seq", type=int, default=None, help="length of the capped runs (default: the longest)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args(argv)
    args.seqs, args.cps = [int(x) for x in args.seqs.split(",")], [int(c) for c in args.cps.split(",")]
    return args


def report_plans(args, stream: torch.Tensor, sep_ids: List[int]) -> Dict[str, Any]:
    print("| L | cp | specials | work max/mean contiguous | balanced | keys sent per layer, max rank: ours (plan) | "
          "closed form | ring | block gather (128) | ours / ring |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for seq in args.seqs:
        for cp in args.cps:
            f = out[f"{seq}/{cp}"] = plan_figures(args, stream, seq, cp, sep_ids)
            print(f"| {seq} | {cp} | {f['density'] * 100:.1f}% | {f['work_max_over_mean']['contiguous']:.2f} | "
                  f"{f['work_max_over_mean']['balanced']:.2f} | {max(f['ours_keys'])} | {max(f['closed_keys']):.0f} | "
                  f"{f['ring_keys']} | {max(f['block_keys'])} | "
                  f"{max(f['ours_keys']) / f['ring_keys']:.3f} |", flush=True)
    return out


def print_run(seq: int, name: str, r: Dict[str, Any], one: Dict[str, Any], kv_bytes: int) -> None:
    if r.get("oom"):
        print(f"| {seq} | {name} | out of memory | | | | | | | | |")
        return
    cp = int(name[2]) if name.startswith("CP") else 1
    fwd = max(r["fwd_layer_bytes"]) if cp > 1 else 0.0
    ratio = f"{fwd / ((cp - 1) * (seq // cp) * kv_bytes):.3f}" if cp > 1 else ""
    print(f"| {seq} | {name} | {r['loss']:.4f} | {r['seconds']:.1f} | {r['cpu_max']:.1f} / {r['cpu_sum']:.1f} | "
          f"{mib(r['peak_bytes'])} | {r['peak_bytes'] / one['peak_bytes']:.2f} | {mib(fwd)} | "
          f"{mib(max(r['bwd_layer_bytes']) if cp > 1 else 0)} | {mib(r['grad_sync_bytes'])} | {ratio} |", flush=True)


def report_runs(args, base_for, kv_bytes: int) -> Dict[int, Dict[str, Any]]:
    """One rank, then per cp ours and ring attention, at each length (interleaved)."""
    print("\n| L | layout | loss | step s (wall) | CPU s: max rank / all ranks | peak MiB per rank | vs 1 rank | "
          "fwd MiB/layer/rank (max) | bwd MiB/layer/rank (max) | grad all-reduce MiB | ours fwd / ring fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for seq in args.seqs:
        base = base_for(seq)
        runs = out[seq] = {"1 rank": measure(args, base, seq, "sepllm", 1)}
        for cp in args.cps:
            runs[f"CP{cp}"] = measure(args, base, seq, "sepllm", cp)
            if seq <= args.ring_max_seq:
                runs[f"CP{cp} ring (full attn)"] = measure(args, base, seq, "full", cp)
        for name, r in runs.items():
            print_run(seq, name, r, runs["1 rank"], kv_bytes)
    return out


def report_cap(args, base_for, runs: Dict[str, Any], seq: int) -> Dict[int, Any]:
    """Every layout at ``seq`` under one memory cap (default: a quarter of the way from the largest CP
    peak to the one-rank peak measured at ``seq``)."""
    cps_peak = max(runs[f"CP{c}"]["peak_bytes"] for c in args.cps if not runs.get(f"CP{c}", {}).get("oom"))
    cap_gb = args.cap_gb or (cps_peak + 0.25 * (runs["1 rank"]["peak_bytes"] - cps_peak)) / 2**30
    print(f"\nMemory cap {cap_gb:.2f} GiB above each rank's RSS before the step (RLIMIT_DATA), L = {seq}:")
    out = {}
    for cp in [1] + args.cps:
        r = out[cp] = measure(args, base_for(seq), seq, "sepllm", cp, cap=int(cap_gb * 2**30))
        print(f"  {'1 rank' if cp == 1 else f'CP{cp}'}: " + (
            "out of memory" if r.get("oom") else f"ran, peak {mib(r['peak_bytes'])} MiB per rank"), flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    stream = real_text_tokens(max(args.seqs) + 1)
    sep_ids, eod, vocab = tokenizer_ids()
    kv_bytes = 2 * args.kv_heads * (args.hidden // args.heads) * FP32  # one key + value, fp32
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, gloo, 1 thread per rank; model "
          f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} kv), n_init {args.n_init}, "
          f"n_local {args.n_local}, micro-batch 1, fp32; one key+value = {kv_bytes} bytes per layer\n", flush=True)
    report: Dict[str, Any] = {"plans": report_plans(args, stream, sep_ids)}
    with tempfile.TemporaryDirectory() as tmp:
        def base_for(seq: int) -> Dict[str, Any]:
            tokens = Path(tmp) / f"tokens{seq}.pt"
            torch.save(stream[None, :seq + 1].clone(), tokens)
            return dict(tokens=str(tokens), vocab=vocab, sep_ids=sep_ids, eod=eod, timeout=args.timeout)

        report["runs"] = report_runs(args, base_for, kv_bytes)
        cap_seq = args.cap_seq if args.cap_seq is not None else max(args.seqs)
        if cap_seq:
            report["cap"] = report_cap(args, base_for, report["runs"][cap_seq], cap_seq)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

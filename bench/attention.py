"""Sep-Attention benchmark: dense causal vs Sep-Attention fast path vs the dense-mask reference.

    python bench/attention.py                       # CPU: sdpa, compact, reference at 1k-8k
    python bench/attention.py --device cuda --seqs 4096,8192,16384,32768   # sdpa, flash, flex, triton, ...
    python bench/attention.py --device cuda --json out.json   # also every figure as JSON (after each length)

Per sequence length it prints forward and forward+backward times (median of ``--repeats``,
impls interleaved within each repeat so machine noise hits them alike), the useful FLOPs
(attended q-k pairs only: 4*D per pair forward, 3x that for forward+backward) and the achieved
FLOP rate, all as ratios against dense causal attention measured in the same run. With both
``flex`` and ``triton`` it also prints triton's speedup over flex, the figure that decides whether
``attention.impl: auto`` may pick triton on that device (``megatron/attention/dispatch.py``).

Dense baselines: ``flash`` (the ``flash_attn`` package), ``sdpa_flash`` (SDPA pinned to its
FlashAttention backend, CUDA) and ``sdpa`` (SDPA, backend of PyTorch's choice); the speedup column is
measured against the first of them that ran.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.attention import attend, kv_kept_per_query  # noqa: E402
from megatron.attention.sepllm_rule import SepRule  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seqs", default=None, help="comma-separated lengths (default 1k-8k cpu, 4k-32k cuda)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default = heads)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--n-local", type=int, default=64)
    p.add_argument("--density", type=float, default=0.12, help="separator density of the random layout")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json: take the separator layout from --text")
    p.add_argument("--text", default=None,
                   help="text (or .jsonl with 'text' fields) tokenized for a real separator layout, "
                        "e.g. --tokenizer data/sample/tokenizer.json --text data/sample/corpus.jsonl")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--impls", default=None,
                   help="comma list (default cpu: sdpa,compact,reference; cuda: sdpa,flash,flex,triton,reference); "
                        "also sdpa_flash (SDPA pinned to its flash backend) and flex_plain")
    p.add_argument("--ref-max-seq", type=int, default=None,
                   help="skip the dense-mask reference above this length (default 8192)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu = process CPU time: steadier on a shared machine, meaningful with --threads 1")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file (rewritten after "
                                                "each length, so a run stopped early keeps what it measured)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.seqs = [int(s) for s in (args.seqs or ("4096,8192,16384,32768" if cuda else
                                                "1024,2048,4096,8192")).split(",")]
    args.impls = (args.impls or ("sdpa,flash,flex,triton,reference" if cuda else "sdpa,compact,reference")).split(",")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.kv_heads = args.kv_heads or args.heads
    args.ref_max_seq = args.ref_max_seq or 8192
    return args


def separator_layout(args: argparse.Namespace, L: int, generator: torch.Generator) -> torch.Tensor:
    """[B, L] bool separator flags: from real text when given, else random at ``--density``."""
    if not (args.tokenizer and args.text):
        return torch.rand(args.batch, L, generator=generator) < args.density
    from megatron.config.schema import SepLLMConfig
    from megatron.tokenizer.tokenizer import HFTokenizer
    tok = HFTokenizer.from_file(args.tokenizer)
    cfg = SepLLMConfig()
    sep_ids = torch.tensor(tok.separator_ids(cfg.separator_tokens, cfg.include_space_prefixed))
    with open(args.text, encoding="utf-8") as f:
        text = ("\n".join(json.loads(line)["text"] for line in f if line.strip())
                if args.text.endswith(".jsonl") else f.read())
    ids = torch.tensor(tok.encode(text))
    need = args.batch * L
    ids = ids.repeat(need // max(ids.numel(), 1) + 1)[:need].view(args.batch, L)
    return torch.isin(ids, sep_ids)


DENSE_BASELINES = ("flash", "sdpa_flash", "sdpa")  # the speedup column's baseline: the first that ran


def make_impl(name: str, rule: SepRule) -> Callable:
    if name == "flex_plain":
        return flex_over_original_layout(rule)
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(q, k, v, is_sep):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises rather than falling back to another backend
                return attend(q, k, v, is_sep, rule, impl="sdpa")
        return pinned
    impl = name

    def run(q, k, v, is_sep):
        return attend(q, k, v, is_sep, rule, impl=impl)
    return run


def flex_over_original_layout(rule: SepRule) -> Callable:
    """What the SepLLM reference does on GPU: FlexAttention over the original key order, the
    BlockMask made by evaluating the rule on all L x L pairs (create_block_mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, is_sep):
        sep = is_sep

        def mask_mod(b, h, qi, kj):
            return (kj <= qi) & ((kj < rule.n_init) | sep[b, kj] | (qi - kj < rule.n_local))
        bm = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device,
                               _compile=True)
        return compiled(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])
    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable, q, k, v, is_sep, grad, device: str, backward: bool,
              clock: Callable[[], float] = time.perf_counter) -> float:
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    is_sep = is_sep.clone()  # a fresh tensor: per-call setup (plans, masks) is timed, as for 1 layer
    sync(device)
    t0 = clock()
    if backward:
        fn(*leaves, is_sep).backward(grad)
    else:
        with torch.no_grad():
            fn(*leaves, is_sep)
    sync(device)
    return clock() - t0


def bench_length(args: argparse.Namespace, L: int, rule: SepRule) -> Dict[str, Dict[str, float]]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator().manual_seed(L)
    shape_q = (args.batch, args.heads, L, args.dim)
    shape_kv = (args.batch, args.kv_heads, L, args.dim)
    q, k, v, grad = (torch.randn(s, generator=g).to(args.device, dtype)
                     for s in (shape_q, shape_kv, shape_kv, shape_q))
    is_sep = separator_layout(args, L, g).to(args.device)
    impls = [n for n in args.impls if not (n == "reference" and L > args.ref_max_seq)]
    fns = {n: make_impl(n, rule) for n in impls}
    usable: Dict[str, Callable] = {}
    skipped: Dict[str, str] = {}
    for name, fn in fns.items():  # warm-up (compiles, allocator) and availability check
        try:
            for backward in ([False] if args.no_backward else [False, True]):
                time_once(fn, q, k, v, is_sep, grad, args.device, backward)
            usable[name] = fn
        except (RuntimeError, NotImplementedError) as err:
            skipped[name] = (str(err).splitlines() or [type(err).__name__])[0][:300]
            print(f"  [{name} skipped at L={L}: {skipped[name][:100]}]", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    samples: Dict[str, Dict[str, List[float]]] = {n: {"fwd": [], "fwdbwd": []} for n in usable}
    for _ in range(args.repeats):
        for name, fn in usable.items():
            samples[name]["fwd"].append(time_once(fn, q, k, v, is_sep, grad, args.device, False, clock))
            if not args.no_backward:
                samples[name]["fwdbwd"].append(time_once(fn, q, k, v, is_sep, grad, args.device, True, clock))
    result = {n: {m: statistics.median(ts) for m, ts in s.items() if ts} for n, s in samples.items()}
    pairs_sep = float(kv_kept_per_query(is_sep.cpu(), rule).sum()) / args.batch
    result["_pairs"] = {"sep": pairs_sep, "causal": L * (L + 1) / 2}
    result["_skipped"] = skipped
    return result


def useful_flops(pairs: float, args: argparse.Namespace, backward: bool) -> float:
    fwd = 4.0 * pairs * args.dim * args.heads * args.batch
    return 3.0 * fwd if backward else fwd


def figures(args: argparse.Namespace, L: int, res: Dict[str, Any]) -> Dict[str, Any]:
    """Every figure of one length: per impl ms, speedup over the dense baseline, FLOP rate and its
    ratio to the baseline's (attended pairs only), for fwd and fwd+bwd; and triton / flex."""
    pairs = res["_pairs"]
    dense = next((n for n in DENSE_BASELINES if n in res), None)
    impls: Dict[str, Dict[str, Optional[float]]] = {}
    for name in [n for n in args.impls if n in res]:
        p = pairs["causal"] if name in DENSE_BASELINES else pairs["sep"]
        row: Dict[str, Optional[float]] = {}
        for mode, backward in (("fwd", False), ("fwdbwd", True)):
            if mode not in res[name]:
                continue
            t, t_dense = res[name][mode], res.get(dense, {}).get(mode)
            rate = useful_flops(p, args, backward) / t
            dense_rate = useful_flops(pairs["causal"], args, backward) / t_dense if t_dense else None
            row[f"{mode}_ms"] = t * 1e3
            row[f"{mode}_speedup"] = t_dense / t if t_dense else None
            row[f"{mode}_gflops"] = rate / 1e9
            row[f"{mode}_rate_vs_dense"] = rate / dense_rate if dense_rate else None
        if "fwd" in res[name] and "fwdbwd" in res[name]:  # backward time / forward time
            row["bwd_over_fwd"] = (res[name]["fwdbwd"] - res[name]["fwd"]) / res[name]["fwd"]
        impls[name] = row
    out: Dict[str, Any] = {"L": L, "sep_pairs_over_causal": pairs["sep"] / pairs["causal"],
                           "dense_baseline": dense, "impls": impls, "skipped": res.get("_skipped", {})}
    if "flex" in res and "triton" in res:
        out["triton_over_flex"] = {m: res["flex"][m] / res["triton"][m]
                                   for m in ("fwd", "fwdbwd") if m in res["flex"] and m in res["triton"]}
    return out


def report(fig: Dict[str, Any]) -> List[str]:
    rows = []
    for name, row in fig["impls"].items():
        cells = [f"{fig['L']}", name]
        for mode in ("fwd", "fwdbwd"):
            if f"{mode}_ms" not in row:
                cells += ["-", "-", "-"]
                continue
            speedup, ratio = row[f"{mode}_speedup"], row[f"{mode}_rate_vs_dense"]
            cells += [f"{row[f'{mode}_ms']:.1f}", f"{speedup:.2f}x" if speedup else "-",
                      f"{row[f'{mode}_gflops']:.1f} ({ratio:.2f})" if ratio else f"{row[f'{mode}_gflops']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_json(path: str, args: argparse.Namespace, device: str, lengths: List[Dict[str, Any]]) -> None:
    from megatron.checkpointing.integrity import atomic_write_text

    settings = {k: getattr(args, k) for k in ("device", "dtype", "batch", "heads", "kv_heads", "dim", "n_init",
                                              "n_local", "repeats", "impls", "seqs", "tokenizer", "text",
                                              "density", "clock")}
    doc = {"bench": "attention", "device_name": device, "torch": torch.__version__, "settings": settings,
           "lengths": lengths}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rule = SepRule("sepllm", args.n_init, args.n_local)
    if args.device == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu is for CPU runs")
    from torch._dynamo import config as dynamo_config

    # flex compiles once per (length, grad mode): 4 lengths fill the default limit of 8 exactly; past it
    # torch would fall back to eager FlexAttention, which materializes every score.
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    dev = (torch.cuda.get_device_name() if args.device == "cuda" else
           f"CPU, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"# Sep-Attention bench: {dev}, torch {torch.__version__}, {args.dtype}, B={args.batch} "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.dim} n_init={args.n_init} n_local={args.n_local} "
          f"separators={f'text ({args.text})' if args.text else f'random {args.density}'}, "
          f"median of {args.repeats}")
    print("# speedup = dense causal time / this time; GFLOP/s counts attended q-k pairs only "
          "(ratio to the dense baseline's rate in brackets)")
    summary, table, vs_ref, vs_flex = [], [], [], []
    lengths: List[Dict[str, Any]] = []
    for L in args.seqs:
        res = bench_length(args, L, rule)
        pairs = res["_pairs"]
        summary.append(f"| {L} | {100 * pairs['sep'] / pairs['causal']:.1f}% | "
                       f"{pairs['causal'] / pairs['sep']:.2f}x |")
        lengths.append(figures(args, L, res))
        if args.json:
            write_json(args.json, args, dev, lengths)
        rows = report(lengths[-1])
        print("\n".join(rows), flush=True)
        table += rows
        ref = res.get("reference", {})
        for fast in (n for n in ("compact", "flex", "triton") if n in res and ref):
            vs_ref.append(f"| {L} | {fast} | " + " | ".join(
                f"{ref[m] / res[fast][m]:.2f}x" if m in ref and m in res[fast] else "-"
                for m in ("fwd", "fwdbwd")) + " |")
        if "flex" in res and "triton" in res:
            vs_flex.append(f"| {L} | " + " | ".join(
                f"{res['flex'][m] / res['triton'][m]:.2f}x" if m in res["triton"] and m in res["flex"] else "-"
                for m in ("fwd", "fwdbwd")) + " |")
    print("\n| L | attended pairs / causal pairs | causal FLOPs / Sep FLOPs |\n|---|---|---|")
    print("\n".join(summary))
    print("\n| L | impl | fwd ms | fwd speedup | fwd GFLOP/s | fwd+bwd ms | fwd+bwd speedup | "
          "fwd+bwd GFLOP/s |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if vs_ref:
        print("\n| L | fast impl | fwd speedup vs dense-mask reference | fwd+bwd speedup vs reference |"
              "\n|---|---|---|---|")
        print("\n".join(vs_ref))
    if vs_flex:
        print(f"\n| L | triton speedup over flex, fwd | fwd+bwd |  ({dev})\n|---|---|---|")
        print("\n".join(vs_flex))


if __name__ == "__main__":
    main()

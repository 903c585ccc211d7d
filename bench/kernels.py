"""Fused kernels (RoPE, LayerNorm/RMSNorm, cross-entropy): correctness against fp64 and fwd+bwd timing.

On a CUDA machine, for each kernel and shape:
  * checks the Triton kernel's outputs and input grads against an fp64 reference (random inputs),
  * times fwd+bwd of Triton vs eager vs torch.compile(eager) (triton.testing.do_bench, median, L2 flushed),
  * computes the bandwidth floor from the bytes each op must move, and prints achieved GB/s and
    % of --peak-gbps (default by device name: 3350 GB/s H100 SXM HBM3, 4800 GB/s H200 HBM3e).
Targets: fused >= 1.5x eager and within 10% of the bandwidth floor (>= ~91% of peak).

Without CUDA (or with --cpu-check) it runs a correctness-only pass through Triton's CPU interpreter
on small odd shapes plus an ahead-of-time sm_90 compile of every kernel; timings need a GPU.

    python bench/kernels.py                 # GPU: check + time everything
    python bench/kernels.py --only norm     # one kernel family
    python bench/kernels.py --cpu-check     # no GPU: interpreter correctness + sm_90 compile report
    python bench/kernels.py --sweep-norm    # GPU: norm num_warps / backward-programs sweep
    python bench/kernels.py --quick --json k.json   # GPU: fewer shapes; every figure also as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _wants_cpu_check(argv: Sequence[str]) -> bool:
    if "--cpu-check" in argv:
        return True
    import torch
    return not torch.cuda.is_available()


# The interpreter has to be on before anything imports triton (megatron.kernels imports it lazily).
if __name__ == "__main__" and _wants_cpu_check(sys.argv[1:]):
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from megatron import kernels  # noqa: E402

Tensors = Tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------------------------
# fp64 references
# ----------------------------------------------------------------------------------------------

def ref_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    """Pairs as complex numbers times e^{i*theta}."""
    xd = x.double()
    rot = xd[..., :rotary_dim]
    half = rotary_dim // 2
    if interleaved:
        re, im = rot[..., 0::2], rot[..., 1::2]
    else:
        re, im = rot[..., :half], rot[..., half:]
    turned = torch.complex(re, im) * torch.complex(cos.double(), sin.double())[:, :, None, :]
    if interleaved:
        out = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((out, xd[..., rotary_dim:]), dim=-1)


def ref_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool):
    xd = x.double()
    if not rms:
        xd = xd - xd.mean(-1, keepdim=True)
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y if bias is None else y + bias.double()


def ref_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    z = logits.double()
    keep = targets != ignore_index
    picked = z.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return torch.where(keep, torch.logsumexp(z, -1) - picked, torch.zeros_like(picked))


# ----------------------------------------------------------------------------------------------
# Cases: a case builds inputs, a function of them for each implementation, its fp64 reference,
# and the bytes an op of that shape must move (fwd + bwd).
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    family: str
    name: str
    inputs: Tensors  # leaves that get grads
    run: Callable[[Optional[bool]], Tensors]  # fused flag -> outputs
    reference: Callable[[Tensors], Tensors]  # fp64 leaves -> fp64 outputs
    floor_bytes: int
    dtype: torch.dtype


def rotary_case(B: int, L: int, Hq: int, Hk: int, D: int, rotary_dim: int, interleaved: bool,
                dtype: torch.dtype, device: str) -> Case:
    q = torch.randn(B, L, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, L, Hk, D, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(L, device=device, dtype=torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    angles = (pos[:, None] * inv_freq[None, :])[None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    es = q.element_size()
    floor = 4 * (q.numel() + k.numel()) * es + 2 * 2 * cos.numel() * 4
    return Case("rope", f"B{B} L{L} Hq{Hq} Hk{Hk} D{D} rot{rotary_dim}{' il' if interleaved else ''}", (q, k),
                lambda fused: kernels.apply_rotary_qk(q, k, cos, sin, rotary_dim, interleaved, fused=fused),
                lambda ins: (ref_rotary(ins[0], cos, sin, rotary_dim, interleaved),
                             ref_rotary(ins[1], cos, sin, rotary_dim, interleaved)),
                floor, dtype)


def norm_case(M: int, N: int, rms: bool, residual: bool, dtype: torch.dtype, device: str) -> Case:
    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) if residual else None
    w = (1 + 0.1 * torch.randn(N, device=device)).requires_grad_(True)
    b = None if rms else (0.1 * torch.randn(N, device=device)).requires_grad_(True)
    eps = 1e-5
    leaves = tuple(t for t in (x, r, w, b) if t is not None)

    def run(fused: Optional[bool]) -> Tensors:
        out = kernels.rms_norm(x, w, eps, r, fused=fused) if rms else kernels.layer_norm(x, w, b, eps, r, fused=fused)
        return out if isinstance(out, tuple) else (out,)

    def reference(ins: Tensors) -> Tensors:
        it = iter(ins)
        xd = next(it)
        rd = next(it) if residual else None
        wd = next(it)
        bd = None if rms else next(it)
        s = xd + rd if residual else xd
        return (ref_norm(s, wd, bd, eps, rms),) + ((s,) if residual else ())

    # fwd: read x (+r), write y (+sum); bwd: read dy, the saved input (+d sum), write dx; + stats
    floor = M * N * x.element_size() * (5 + 3 * residual) + M * 4 * 2 * (1 if rms else 2)
    name = f"{'rms' if rms else 'layer'}norm M{M} N{N}{' +res' if residual else ''}"
    return Case("norm", name, leaves, run, reference, floor, dtype)


def cross_entropy_case(N: int, V: int, dtype: torch.dtype, device: str) -> Case:
    logits = (3 * torch.randn(N, V, device=device)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=device)
    targets[::7] = -100
    floor = 3 * N * V * logits.element_size() + N * (8 + 4 + 4)
    return Case("ce", f"N{N} V{V}", (logits,),
                lambda fused: (kernels.fused_cross_entropy(logits, targets, fused=fused),),
                lambda ins: (ref_cross_entropy(ins[0], targets),), floor, dtype)


def gpu_cases(only: Optional[str], dtype: torch.dtype, quick: bool = False) -> List[Callable[[], Case]]:
    """Every shape; ``quick``: the first two RoPE shapes (Llama-8B-like GQA, Pythia-160M), the norms at
    16384 x 4096 and x 768 (LayerNorm alone, RMSNorm with the residual) and the first two losses."""
    d = "cuda"
    cases: List[Callable[[], Case]] = []
    if only in (None, "rope"):
        shapes = ((8, 4096, 32, 8, 128, 128, False), (8, 2048, 12, 12, 64, 16, False),
                  (8, 2048, 16, 16, 128, 64, True), (3, 1000, 7, 1, 80, 40, False))
        for shape in shapes[:2] if quick else shapes:
            cases.append(lambda s=shape: rotary_case(*s, dtype, d))
    if only in (None, "norm"):
        sizes = ((16384, 4096), (16384, 768)) if quick else ((16384, 4096), (16384, 768), (8192, 8192), (4097, 1000))
        kinds = ((False, False), (True, True)) if quick else tuple((rms, res) for rms in (False, True)
                                                                   for res in (False, True))
        for M, N in sizes:
            for rms, residual in kinds:
                cases.append(lambda M=M, N=N, rms=rms, residual=residual: norm_case(M, N, rms, residual, dtype, d))
    if only in (None, "ce"):
        shapes_ce = ((8192, 50304), (4096, 128256), (1000, 32001))
        for N, V in shapes_ce[:2] if quick else shapes_ce:
            cases.append(lambda N=N, V=V: cross_entropy_case(N, V, dtype, d))
    return cases


def cpu_cases(only: Optional[str]) -> List[Callable[[], Case]]:
    f32, bf16, d = torch.float32, torch.bfloat16, "cpu"
    cases: List[Callable[[], Case]] = []
    if only in (None, "rope"):
        cases += [lambda: rotary_case(2, 7, 3, 1, 24, 12, False, f32, d),
                  lambda: rotary_case(2, 7, 3, 1, 24, 12, True, f32, d),
                  lambda: rotary_case(1, 5, 2, 2, 16, 16, False, bf16, d)]
    if only in (None, "norm"):
        cases += [lambda rms=rms, res=res: norm_case(5, 33, rms, res, f32, d)
                  for rms in (False, True) for res in (False, True)]
        cases.append(lambda: norm_case(6, 40, False, True, bf16, d))
    if only in (None, "ce"):
        cases += [lambda: cross_entropy_case(6, 37, f32, d), lambda: cross_entropy_case(4, 5000, bf16, d)]
    return cases


# ----------------------------------------------------------------------------------------------
# Checking and timing
# ----------------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def fwd_bwd(case: Case, fused: Optional[bool], upstream: Tensors) -> Callable[[], Tensors]:
    def step() -> Tensors:
        outs = case.run(fused)
        return torch.autograd.grad(outs, case.inputs, upstream[: len(outs)])
    return step


def check(case: Case, fused: Optional[bool]) -> Tuple[bool, float]:
    """(pass, worst error / tolerance) over outputs and grads vs the fp64 reference."""
    outs = case.run(fused)
    upstream = tuple(torch.randn_like(o, dtype=torch.float64) for o in outs)
    grads = torch.autograd.grad(outs, case.inputs, tuple(u.to(o.dtype) for u, o in zip(upstream, outs)))
    ref_inputs = tuple(t.detach().double().requires_grad_(True) for t in case.inputs)
    ref_outs = case.reference(ref_inputs)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, upstream)
    tol = TOLERANCE[case.dtype]
    worst = 0.0
    for got, want in list(zip(outs, ref_outs)) + list(zip(grads, ref_grads)):
        scale = max(1.0, want.abs().max().item())  # grads reduced over many rows grow with M
        err = ((got.double() - want).abs() / (tol * (scale + want.abs()))).max().item()
        worst = max(worst, err)
    return worst <= 1.0, worst


def time_ms(fn: Callable[[], object]) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def compiled_runner(case: Case) -> Callable[[Optional[bool]], Tensors]:
    compiled = torch.compile(lambda: case.run(False), dynamic=False)
    return lambda fused: compiled()


# HBM bandwidth by device name (vendor data sheets, GB/s), for the % of peak column.
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def device_peak_gbps(name: str) -> float:
    return next((v for k, v in PEAK_GBPS.items() if k in name), 3350.0)


def write_json(path: Optional[str], doc: Dict[str, Any]) -> None:
    if not path:
        return
    from megatron.checkpointing.integrity import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def run_gpu(args: argparse.Namespace) -> int:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = torch.cuda.get_device_name()
    args.peak_gbps = args.peak_gbps or device_peak_gbps(name)
    print(f"device: {name}  dtype: {args.dtype}  peak: {args.peak_gbps} GB/s  "
          f"torch {torch.__version__}")
    doc: Dict[str, Any] = {"bench": "kernels", "device_name": name, "torch": torch.__version__, "dtype": args.dtype,
                           "peak_gbps": args.peak_gbps, "cases": []}
    header = (f"{'case':<40} {'check':>10} {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} {'x eager':>8} "
              f"{'x compile':>9} {'floor ms':>9} {'GB/s':>7} {'% peak':>7} {'extra MB f/e':>13}")
    print(header)
    failures = 0
    for make in gpu_cases(args.only, dtype, args.quick):
        case = make()
        ok, worst = check(case, True)
        eager_ok, _ = check(case, False)
        failures += (not ok) + (not eager_ok)
        outs = case.run(True)
        upstream = tuple(torch.randn_like(o) for o in outs)
        fused_ms = time_ms(fwd_bwd(case, True, upstream))
        eager_ms = time_ms(fwd_bwd(case, False, upstream))
        compile_ms = float("nan")
        if not args.no_compile:
            try:
                compiled_case = Case(case.family, case.name, case.inputs, compiled_runner(case), case.reference,
                                     case.floor_bytes, case.dtype)
                compile_ms = time_ms(fwd_bwd(compiled_case, None, upstream))
            except Exception as exc:  # a compile failure should not hide the other numbers
                print(f"  torch.compile failed for {case.name}: {type(exc).__name__}: {exc}"[:300])
        floor_ms = case.floor_bytes / (args.peak_gbps * 1e9) * 1e3
        gbps = case.floor_bytes / (fused_ms * 1e-3) / 1e9
        extra = f"{peak_extra_bytes(fwd_bwd(case, True, upstream)) / 2**20:.0f}/" \
                f"{peak_extra_bytes(fwd_bwd(case, False, upstream)) / 2**20:.0f}"
        verdict = "ok" if ok and eager_ok else ("FAIL" if not ok else "EAGERFAIL")
        print(f"{case.family + ' ' + case.name:<40} {verdict + f' {worst:.2f}':>10} {fused_ms:>9.3f} {eager_ms:>9.3f} "
              f"{compile_ms:>10.3f} {eager_ms / fused_ms:>8.2f} {compile_ms / fused_ms:>9.2f} {floor_ms:>9.3f} "
              f"{gbps:>7.0f} {100 * gbps / args.peak_gbps:>6.1f}% {extra:>13}")
        doc["cases"].append({
            "family": case.family, "case": case.name, "check": verdict, "worst_error_over_tolerance": worst,
            "fused_ms": fused_ms, "eager_ms": eager_ms, "compile_ms": compile_ms if compile_ms == compile_ms else None,
            "speedup_vs_eager": eager_ms / fused_ms,
            "speedup_vs_compile": compile_ms / fused_ms if compile_ms == compile_ms else None,
            "floor_ms": floor_ms, "gbps": gbps, "pct_of_peak": 100 * gbps / args.peak_gbps,
            "extra_mb_fused_eager": extra})
        write_json(args.json, doc)
        del case, outs, upstream
        torch.cuda.empty_cache()
    print("check = worst |error| / tolerance over outputs and grads vs fp64 (<= 1 passes); "
          "GB/s and % peak from the bytes each op must move fwd+bwd; extra MB = peak memory above "
          "the inputs during one fwd+bwd, fused/eager")
    print("targets: x eager >= 1.5 and fused ms <= 1.1 x floor ms")
    return 1 if failures else 0


def sweep_norm(args: argparse.Namespace) -> None:
    """Norm launch parameters (num_warps; backward programs per SM) around the built-in heuristic."""
    from megatron.kernels import triton_norm

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    doc: Dict[str, Any] = {"bench": "kernels_sweep_norm", "device_name": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "dtype": args.dtype, "rows": []}
    default_warps, default_programs = triton_norm.num_warps_for, triton_norm.backward_programs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'case':<40} {'warps':>5} {'progs/SM':>8} {'fwd+bwd ms':>10}  "
          "(built-in: warps = BLOCK_N/256 in [1, 16], 4 programs/SM)")
    try:
        for M, N in ((16384, 768), (16384, 4096)) + (() if args.quick else ((8192, 8192),)):
            for rms, residual in ((False, False), (True, True)):
                case = norm_case(M, N, rms, residual, dtype, "cuda")
                upstream = tuple(torch.randn_like(o) for o in case.run(True))
                for warps in (2, 4, 8, 16):
                    for per_sm in (1, 2, 4, 8):
                        triton_norm.num_warps_for = lambda block_n, w=warps: w
                        triton_norm.backward_programs = lambda device, rows, k=per_sm: max(1, min(rows, k * sms))
                        ms = time_ms(fwd_bwd(case, True, upstream))
                        print(f"{case.family + ' ' + case.name:<40} {warps:>5} {per_sm:>8} {ms:>10.3f}")
                        doc["rows"].append({"case": case.name, "num_warps": warps, "programs_per_sm": per_sm,
                                            "fwdbwd_ms": ms})
                write_json(args.json, doc)
    finally:
        triton_norm.num_warps_for, triton_norm.backward_programs = default_warps, default_programs


def run_cpu_check(args: argparse.Namespace) -> int:
    print("no CUDA (or --cpu-check): correctness only, Triton kernels through TRITON_INTERPRET=1 on small "
          "shapes; timings and bandwidth need a GPU (run this script on a CUDA machine).")
    failures = 0
    for make in cpu_cases(args.only):
        case = make()
        ok, worst = check(case, True)
        eager_ok, eager_worst = check(case, False)
        failures += (not ok) + (not eager_ok)
        print(f"{case.family + ' ' + case.name:<40} triton {'ok' if ok else 'FAIL'} ({worst:.2f})  "
              f"eager {'ok' if eager_ok else 'FAIL'} ({eager_worst:.2f})  [worst |error| / tolerance]")
    if not args.no_compile:
        print("ahead-of-time compile for sm_90 (registers / spill bytes per kernel variant, from ptxas):")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "megatron.kernels.aot_check"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        print(proc.stdout if proc.returncode == 0 else f"compile FAILED:\n{proc.stderr[-3000:]}")
        failures += proc.returncode != 0
    print("PASS" if not failures else f"{failures} FAILURES")
    return 1 if failures else 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-check", action="store_true", help="correctness only, via the Triton interpreter")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="HBM peak for the %% column (default by device name: H200 4800, H100 SXM 3350)")
    parser.add_argument("--only", choices=["rope", "norm", "ce"], help="one kernel family")
    parser.add_argument("--quick", action="store_true", help="GPU: a subset of the shapes (see gpu_cases)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (GPU) / the sm_90 compile (CPU)")
    parser.add_argument("--sweep-norm", action="store_true", help="GPU: time norm launch-parameter variants")
    parser.add_argument("--json", default=None, help="GPU: also write every figure to this JSON file (rewritten "
                                                     "after each row)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return run_cpu_check(args)
    if args.sweep_norm:
        sweep_norm(args)
        return 0
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time lowering of the Sep-Attention Triton kernels (``triton_sep.py``) to cubins, no GPU needed.

Every shipped configuration (``triton_sep.CONFIGS``: kernel x padded head dim x 16-bit/fp32, each
16-bit row for bf16 and fp16, each with no documents / contiguous documents / repeated document ids)
is compiled for the given architecture with Triton's bundled ptxas; the register and spill counts
ptxas reports come back as ``aot_check.CompileReport`` rows, and the command fails if a 16-bit variant
spills.
Run: ``python -m megatron.attention.triton_aot --arch 90 [--sample | --quick]`` (TRITON_INTERPRET unset);
``make aot-check`` runs the full sweep for sm_90 and sm_80.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from megatron.attention import triton_sep, triton_sep_kernels
from megatron.kernels.aot_check import CompileReport, compile_kernel, print_reports

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (kernel name in CONFIGS, the jit function)
_KERNELS = (("fwd", triton_sep_kernels.sep_fwd_kernel), ("dq", triton_sep_kernels.sep_dq_kernel),
            ("dkdv", triton_sep_kernels.sep_dkdv_local_kernel), ("dkdv", triton_sep_kernels.sep_dkdv_special_kernel))
_INT_TABLES = ("spos_ptr", "sdoc_ptr", "n_before_ptr", "doc_ptr", "run_start_ptr", "run_end_ptr")
_FP32_BUFFERS = ("lse_ptr", "delta_ptr", "dkp_ptr", "dvp_ptr")
_STRIDE = re.compile(r"^s(q|k|v|o|do|dq|dk)_[bhl]$")  # tensor strides: multiples of the head dim
DOC_VARIANTS = ((False, True), (True, True), (True, False))  # (HAS_DOCS, CONTIGUOUS)


# How much of the sweep to lower: every shipped variant, each (kernel, dtype, head dim) once, or the two
# largest kernels at bf16 / D=128 / documents.
SCOPES = ("all", "sample", "quick")


def shipped_variants(scope: str = "all") -> Iterator[Tuple[str, object, int, torch.dtype, bool, bool]]:
    """(config kernel, jit kernel, head dim, dtype, has_docs, contiguous) for every shipped launch in
    ``scope``. "sample" takes each kernel x dtype x head dim once, the document variant rotating so that
    every kernel meets each variant at every head dim (36 of the 108)."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; expected one of {SCOPES}")
    quick = scope == "quick"
    dims = sorted({d for _, d, _ in triton_sep.CONFIGS})
    rotation = 0
    for D in ([128] if quick else dims):
        for dtype in ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]):
            for name, kernel in (_KERNELS[::3] if quick else _KERNELS):  # quick: fwd, dkdv_special
                if scope == "sample":
                    docs = [DOC_VARIANTS[rotation % len(DOC_VARIANTS)]]
                    rotation += 1
                else:
                    docs = DOC_VARIANTS[1:2] if quick else DOC_VARIANTS
                for has_docs, contiguous in docs:
                    yield name, kernel, D, dtype, has_docs, contiguous


def compile_sep_attention(arch: int = 90, scope: str = "all") -> Iterator[CompileReport]:
    """One report per shipped variant in ``scope``, yielded as each compiles (the full sweep takes
    10-35 minutes per architecture on 2 cores)."""
    for name, kernel, D, dtype, has_docs, contiguous in shipped_variants(scope):
        cfg = triton_sep.kernel_config(name, D, dtype)
        meta: Dict[str, object] = dict(HAS_DOCS=has_docs, CONTIGUOUS=contiguous, D=D,
                                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                       BLOCK_D=triton_sep.padded_head_dim(D),
                                       PRECISION=triton_sep.dot_precision(dtype))
        pointers = {p: "i32" for p in _INT_TABLES}
        pointers.update({p: "fp32" for p in _FP32_BUFFERS})
        aligned = tuple(p.name for p in kernel.params if p.name.endswith("_ptr") or _STRIDE.match(p.name))
        tag = (f"D={D},{_DTYPE_NAMES[dtype]},docs={'none' if not has_docs else 'contig' if contiguous else 'ids'},"
               f"M={cfg.block_m},N={cfg.block_n}")
        yield compile_kernel(tag, kernel, meta, cfg.num_warps, arch, pointers, _DTYPE_NAMES[dtype],
                             num_stages=cfg.num_stages, divisible_by_16=aligned)


def spilling(reports: Iterable[CompileReport]) -> List[str]:
    """The 16-bit variants (the GPU training path) that spill registers or whose spills ptxas did not
    report; fp32, a correctness fallback, may spill."""
    return [r.name for r in reports if r.spill_bytes != 0 and ",fp32," not in r.name]


if __name__ == "__main__":
    import sys

    from megatron.cli import cli_parser

    parser = cli_parser(__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", dest="scope", action="store_const", const="quick",
                       help="forward and special dK/dV kernels only, bf16, head dim 128, documents")
    scope.add_argument("--sample", dest="scope", action="store_const", const="sample",
                       help="each kernel x dtype x head dim once (36 of the 108 variants)")
    args = parser.parse_args()
    reports = []
    for report in compile_sep_attention(args.arch, scope=args.scope or "all"):
        print_reports([report])
        reports.append(report)
    bad = spilling(reports)
    if bad:
        sys.exit(f"error: {len(bad)} 16-bit variants spill registers on sm_{args.arch}: {', '.join(bad)}")

"""Compile every Triton kernel ahead of time for a GPU architecture, without a GPU.

Triton's interpreter checks what the kernels compute; it does not check that they compile (it is more
lenient about types in loops, for one). This module lowers each kernel variant the ops can launch
all the way to a cubin with the bundled ptxas, and reads the register / spill counts ptxas reports,
so a machine with no GPU still catches compile errors and register-pressure regressions.
Must run with TRITON_INTERPRET unset (the interpreter replaces ``triton.jit``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron.kernels import triton_cross_entropy, triton_norm, triton_rope


@dataclass
class CompileReport:
    name: str
    num_warps: int
    registers: Optional[int]
    spill_bytes: Optional[int]


def _signature(kernel, constexprs: Dict[str, object], pointer_types: Dict[str, str],
               default_pointer: str) -> Dict[str, str]:
    signature = {}
    for param in kernel.params:
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, default_pointer)
        elif name in ("eps", "qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _ptxas_usage(ptx: str, arch: int) -> Tuple[Optional[int], Optional[int]]:
    """(registers, spill-store bytes) as ptxas reports them, using the ptxas Triton itself picks."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def compile_kernel(name: str, kernel, constexprs: Dict[str, object], num_warps: int, arch: int,
                   pointer_types: Optional[Dict[str, str]] = None, default_pointer: str = "bf16",
                   num_stages: Optional[int] = None, divisible_by_16: Tuple[str, ...] = ()) -> CompileReport:
    """``divisible_by_16``: parameters Triton would specialize as multiples of 16 at launch (pointers
    from the caching allocator, strides of head dim multiples) so the cubin is the one a GPU runs."""
    fn = getattr(kernel, "fn", kernel)
    if not hasattr(kernel, "params"):
        raise RuntimeError("aot_check needs real triton.jit kernels: unset TRITON_INTERPRET")
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in divisible_by_16}
    src = ASTSource(kernel, _signature(kernel, constexprs, pointer_types or {}, default_pointer), constexprs, attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return CompileReport(f"{fn.__name__}[{name}]", num_warps, regs, spills)


def compile_all(arch: int = 90) -> List[CompileReport]:
    """Representative variants: bf16 activations, fp32 statistics, Llama/NeoX-like sizes plus odd ones."""
    reports: List[CompileReport] = []
    rope_ptrs = {"cos_ptr": "fp32", "sin_ptr": "fp32"}
    for n_q, n_k, D, rot in ((32, 8, 128, 128), (32, 32, 128, 32), (3, 1, 24, 12)):
        block_h, block_half, block_rest, warps = triton_rope.rotary_blocks(n_q, n_k, D, rot)
        for interleaved in (False, True):
            for inverse in (False, True):
                meta = dict(HALF=rot // 2, ROT=rot, D=D, INTERLEAVED=interleaved, INVERSE=inverse,
                            BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=block_rest)
                reports.append(compile_kernel(f"Hq={n_q},Hk={n_k},D={D},rot={rot},il={int(interleaved)},"
                                              f"inv={int(inverse)}", triton_rope._rotary_qk_kernel, meta, warps,
                                              arch, rope_ptrs))
    norm_ptrs = {"mean_ptr": "fp32", "rstd_ptr": "fp32", "w_ptr": "fp32", "b_ptr": "fp32",
                 "dw_partial_ptr": "fp32", "db_partial_ptr": "fp32"}
    for N in (33, 768, 4096, triton_norm.MAX_FUSED_COLUMNS):
        block_n = triton.next_power_of_2(N)
        warps = triton_norm.num_warps_for(block_n)
        for rms in (False, True):
            for residual in (False, True):
                tag = f"N={N},rms={int(rms)},res={int(residual)}"
                fwd = dict(RMS=rms, HAS_RESIDUAL=residual, HAS_BIAS=not rms, BLOCK_N=block_n)
                bwd = dict(RMS=rms, HAS_DSUM=residual, HAS_BIAS=not rms, BLOCK_N=block_n)
                reports.append(compile_kernel(tag, triton_norm._norm_fwd_kernel, fwd, warps, arch, norm_ptrs))
                reports.append(compile_kernel(tag, triton_norm._norm_bwd_kernel, bwd, warps, arch, norm_ptrs))
    ce_ptrs = {"targets_ptr": "i64", "loss_ptr": "fp32", "lse_ptr": "fp32", "dloss_ptr": "fp32"}
    for V in (37, 50304, 128256):
        block_v = triton_cross_entropy.block_v_for(V, None)
        warps = triton_cross_entropy.num_warps_for(block_v)
        meta = dict(BLOCK_V=block_v)
        reports.append(compile_kernel(f"V={V}", triton_cross_entropy._ce_fwd_kernel, meta, warps, arch, ce_ptrs))
        reports.append(compile_kernel(f"V={V}", triton_cross_entropy._ce_bwd_kernel, meta, warps, arch, ce_ptrs))
    return reports


def print_reports(reports) -> None:
    for report in reports:
        print(f"{report.name:<70} warps={report.num_warps:<3} regs={report.registers} spill={report.spill_bytes}",
              flush=True)


if __name__ == "__main__":
    from megatron.cli import cli_parser

    parser = cli_parser(__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    print_reports(compile_all(parser.parse_args().arch))

"""Decides, per call, whether an op runs its Triton kernel or the eager fallback.

Nothing here imports Triton unless a CUDA tensor asks for the fused path, so CPU-only use of
``megatron.kernels`` never loads it.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

# The norm kernels hold a row in registers; past 8192 columns their backward (row plus dW/dB
# accumulators) spills heavily on sm_90 (see megatron/kernels/aot_check.py), so auto mode sends
# wider rows to eager.
NORM_MAX_FUSED_COLUMNS = 8192


def interpret_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (it must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its backends
        return False
    return True


def use_fused(tensor: torch.Tensor, fused: Optional[bool], op: str) -> bool:
    """``fused``: None = auto (Triton on CUDA when it imports), True = Triton or raise, False = eager.

    A CPU tensor only takes the Triton path when asked explicitly and the interpreter is on; that is
    how the kernels are tested on machines without a GPU.
    """
    if fused is False:
        return False
    if tensor.is_cuda:
        if triton_importable():
            return True
        if fused:
            raise RuntimeError(f"{op}: fused=True but triton cannot be imported; install triton or pass fused=False")
        return False
    if fused is None:
        return False
    if not interpret_enabled():
        raise RuntimeError(f"{op}: fused=True on a {tensor.device.type} tensor needs a CUDA device, or "
                           "TRITON_INTERPRET=1 set before triton is imported to run the kernel in Triton's "
                           "CPU interpreter; pass fused=None/False for the eager path")
    if not triton_importable():
        raise RuntimeError(f"{op}: fused=True but triton cannot be imported")
    return True


def use_fused_norm(x: torch.Tensor, fused: Optional[bool], op: str) -> bool:
    if not use_fused(x, fused, op):
        return False
    return fused is True or x.shape[-1] <= NORM_MAX_FUSED_COLUMNS

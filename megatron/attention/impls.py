"""What each attention kernel can do: the one table. Torch-free, so the config check reads it before
any process starts; ``dispatch.py`` (which kernel runs), ``config/validation.py`` (what a config may ask
for) and ``parallel/context_parallel.py`` (which kernels have a context-parallel form) all read it.

A kernel's row says on which devices it runs, whether it applies the Sep-Attention rule at all (the
dense baselines do not), and whether it runs attention dropout, ALiBi (token-level), ALiBi-BiPE
(segment-level positions), ``separate_documents`` and context parallelism (and on which devices).
``tests/test_attention_impls.py`` checks every declared capability against the kernel's behaviour.

Layers whose rule is ``full`` always run dense causal attention (``dispatch.dense_causal_attention``),
whatever the row says; the row is about the Sep-Attention layers (and, for the dense baselines
``sdpa`` / ``flash``, about every layer). Adding a kernel, or the GPU context-parallel path, is one row
here plus the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class KernelSpec:
    name: str
    devices: Tuple[str, ...]  # device types it runs on
    applies_rule: bool  # False: dense causal attention, the baseline that ignores the Sep rule
    dropout: bool
    alibi: bool  # token-level ALiBi bias
    alibi_bipe: bool  # ALiBi over BiPE's segment positions
    separate_documents: bool
    context_parallel: Tuple[str, ...]  # device types with a context-parallel form; () = none
    interpreter: bool = False  # also runs on CPU under Triton's interpreter (TRITON_INTERPRET=1, tests)
    needs: str = "a supported device"  # the device requirement in words
    instead: str = ""  # what to use when a capability is missing (the refusal's hint)


KERNELS: Dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("reference", ("cpu", "cuda"), True, dropout=True, alibi=True, alibi_bipe=True,
               separate_documents=True, context_parallel=("cpu",)),
    KernelSpec("compact", ("cpu",), True, dropout=False, alibi=True, alibi_bipe=True,
               separate_documents=True, context_parallel=("cpu",), needs="a CPU (PyTorch's CPU flash kernel)",
               instead="'reference'"),
    KernelSpec("flex", ("cpu", "cuda"), True, dropout=False, alibi=True, alibi_bipe=True,
               separate_documents=True, context_parallel=(), instead="'reference'"),
    KernelSpec("triton", ("cuda",), True, dropout=False, alibi=False, alibi_bipe=False,
               separate_documents=True, context_parallel=(), interpreter=True, needs="a CUDA device",
               instead="'flex' (GPU) or 'compact' (CPU)"),
    KernelSpec("sdpa", ("cpu", "cuda"), False, dropout=True, alibi=True, alibi_bipe=True,
               separate_documents=True, context_parallel=("cpu",)),
    KernelSpec("flash", ("cuda",), False, dropout=True, alibi=True, alibi_bipe=False,
               separate_documents=False, context_parallel=(), needs="flash_attn on a CUDA device",
               instead="'sdpa'"),
    # auto: 'compact' on CPU; on CUDA 'triton' where it was measured faster than 'flex'
    # (dispatch.TRITON_BEATS_FLEX) and no ALiBi bias is needed, else 'flex' (see resolve_auto).
    KernelSpec("auto", ("cpu", "cuda"), True, dropout=False, alibi=True, alibi_bipe=True,
               separate_documents=True, context_parallel=("cpu",), instead="'reference'"),
)}

IMPLS = tuple(KERNELS)
CONTEXT_PARALLEL_IMPLS = tuple(name for name, spec in KERNELS.items() if spec.context_parallel)
# What the context-parallel exchange cannot carry, whatever the kernel: the received keys sit in a
# compacted layout with no token distances (no ALiBi) and the exchange has no dropout.
CONTEXT_PARALLEL_EXCLUDES = ("pos_emb: alibi", "bipe", "attention_dropout")


def kernel(impl: str) -> KernelSpec:
    if impl not in KERNELS:
        raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")
    return KERNELS[impl]


def resolve_auto(device_type: str, triton_measured_faster: bool, alibi: bool = False) -> str:
    """What ``auto`` runs for Sep-Attention layers: 'compact' on CPU; on CUDA 'triton' when it was
    measured faster than 'flex' on this device (and no ALiBi bias is needed, which it lacks), else 'flex'."""
    if device_type != "cuda":
        return "compact"
    return "triton" if triton_measured_faster and not alibi else "flex"


def device_problem(impl: str, device_type: str, triton_interpreter: bool = False) -> str:
    """Why ``impl`` cannot run on ``device_type`` (one line), or '' when it can."""
    spec = kernel(impl)
    if device_type in spec.devices or (spec.interpreter and triton_interpreter):
        return ""
    alternatives = [name for name, other in KERNELS.items()
                    if device_type in other.devices and other.applies_rule == spec.applies_rule]
    interpreter = (", or set TRITON_INTERPRET=1 before start to run its kernels in Triton's interpreter "
                   "(slow: for tests)") if spec.interpreter else ""
    return (f"attention.impl '{impl}' needs {spec.needs} (this run is on {device_type}); use "
            + " or ".join(f"'{name}'" for name in alternatives) + f" on {device_type}{interpreter}")

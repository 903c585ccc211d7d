"""Runs the attention implementation ``attention.impl`` names. All take q [B, Hq, L, D], k/v [B, Hkv, L, D].

impls (what each can do -- devices, dropout, ALiBi, BiPE, documents, context parallelism, how ``auto``
resolves -- is ``impls.py``'s table, the one place those facts live):
  * ``reference`` -- dense L x L mask from the rule + SDPA (slow, obviously right);
  * ``compact``   -- Sep-Attention over the compact layout, fused CPU kernel, fwd + bwd;
  * ``flex``      -- FlexAttention over the compact layout (compiled to Triton on CUDA);
  * ``triton``    -- our own fused Triton kernels over the compact layout, fwd + bwd (``triton_sep.py``);
  * ``sdpa``      -- dense causal attention, ignoring the rule (the baseline);
  * ``flash``     -- dense causal attention through ``flash_attn`` (the GPU baseline);
  * ``auto``      -- ``impls.resolve_auto``; on CUDA it picks ``triton`` only on the devices in
                     ``TRITON_BEATS_FLEX``.
Layers whose rule is ``full`` always run dense causal attention.

``TRITON_BEATS_FLEX`` lists the devices (``torch.cuda.get_device_name``) on which a recorded
``bench/attention.py --device cuda --impls flex,triton`` run (bench/RESULTS.md, "Sep-Attention",
real-text separators, fwd+bwd at 16k) measured ``triton`` faster than ``flex``. A device gets an entry
only from such a run; until one exists the table is empty and ``auto`` stays on ``flex``.

``bias``: ALiBi / ALiBi-BiPE (``alibi.py``), added to the scores: an additive float mask for reference /
sdpa / compact, a ``score_mod`` for flex, ``alibi_slopes`` for flash (token-level ALiBi only).
A configuration a kernel cannot run is refused before launch (``config/validation.py`` reads the same
table); the checks here are the last line for direct calls.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from megatron.attention.alibi import AlibiBias, additive_mask
from megatron.attention.impls import IMPLS, device_problem, kernel, resolve_auto
from megatron.attention.reference import expand_kv_heads, reference_attention
from megatron.attention.sepllm_rule import SepRule, dense_mask
from megatron.errors import ConfigError

__all__ = ["IMPLS", "attend", "auto_impl", "check_impl_available", "dense_causal_attention"]

# device name -> the bench/RESULTS.md run that measured impl 'triton' beating 'flex' there (written by
# tools/apply_gpu_report.py from a bench/gpu_day_one.sh report).
TRITON_BEATS_FLEX: Dict[str, str] = {}


def auto_impl(q: torch.Tensor, alibi: bool = False) -> str:
    """What ``auto`` runs for Sep-Attention layers on q's device (``impls.resolve_auto``)."""
    measured = q.is_cuda and torch.cuda.get_device_name(q.device) in TRITON_BEATS_FLEX
    return resolve_auto(q.device.type, measured, alibi)


def triton_unavailable(device: torch.device) -> Optional[str]:
    """Why impl 'triton' cannot run on ``device`` (one line), or None when it can."""
    from megatron.kernels.dispatch import interpret_enabled, triton_importable

    reason = device_problem("triton", device.type, interpret_enabled())
    if reason:
        return reason
    if not triton_importable():
        return "attention.impl 'triton' needs the triton package, which cannot be imported here"
    return None


def check_impl_available(impl: str, device: torch.device) -> None:
    """Before training: a ConfigError (one line) when ``attention.impl`` cannot run on ``device``."""
    reason = triton_unavailable(device) if impl == "triton" else None
    if reason:
        raise ConfigError(reason)


def dense_causal_attention(q, k, v, rule: SepRule, doc_ids=None, scale=None, dropout_p: float = 0.0,
                           bias: Optional[AlibiBias] = None):
    """Plain causal attention (full layers, and the dense baseline); ``bias`` adds ALiBi."""
    separate = rule.separate_documents and doc_ids is not None
    if separate or bias is not None:
        k = expand_kv_heads(k, q.shape[1])
        v = expand_kv_heads(v, q.shape[1])
        flags = torch.ones(q.shape[0] if separate else 1, q.shape[2], dtype=torch.bool, device=q.device)
        keep = dense_mask(flags, rule, doc_ids if separate else None)[:, None]
        mask = keep if bias is None else additive_mask(keep, bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=q.shape[1] != k.shape[1])


def flash_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rule: SepRule,
                           doc_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                           dropout_p: float = 0.0, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """Dense causal attention via flash_attn (GQA native). A baseline: ignores the Sep rule. Token-level
    ALiBi goes to flash_attn's ``alibi_slopes``; ALiBi-BiPE is rejected before launch (validation)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError("attention.impl='flash' needs the flash_attn package (CUDA only); "
                           "use 'sdpa' for the dense baseline or 'flex' for Sep-Attention") from err
    _refuse_missing("flash", rule, doc_ids, dropout_p, bias)
    slopes = None if bias is None else bias.slopes.to(device=q.device, dtype=torch.float32)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          softmax_scale=scale, causal=True, dropout_p=dropout_p, alibi_slopes=slopes)
    return out.transpose(1, 2)


def _refuse_missing(impl: str, rule: SepRule, doc_ids, dropout_p: float, bias: Optional[AlibiBias]) -> None:
    """What ``impl``'s row in impls.py says it cannot run, as one line (validation refuses it earlier)."""
    spec = kernel(impl)
    lacks = [what for what, asked, has in (
        ("attention dropout", bool(dropout_p), spec.dropout),
        ("separate_documents", rule.separate_documents and doc_ids is not None, spec.separate_documents),
        ("ALiBi", bias is not None and bias.positions is None, spec.alibi),
        ("ALiBi-BiPE (segment-level bias)", bias is not None and bias.positions is not None, spec.alibi_bipe),
    ) if asked and not has]
    if lacks:
        hint = f"; use {spec.instead}" if spec.instead else ""
        raise ValueError(f"attention impl '{impl}' has no {lacks[0]}{hint}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor, rule: SepRule,
           doc_ids: Optional[torch.Tensor] = None, impl: str = "auto", scale: Optional[float] = None,
           dropout_p: float = 0.0, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    kernel(impl)  # a ValueError naming the impls for an unknown one
    if impl == "flash":
        return flash_causal_attention(q, k, v, rule, doc_ids, scale, dropout_p, bias)
    if impl == "sdpa" or rule.is_full:
        # impl 'sdpa' means dense causal attention regardless of the rule (the baseline).
        return dense_causal_attention(q, k, v, rule, doc_ids, scale, dropout_p, bias)
    if impl == "auto":
        impl = auto_impl(q, alibi=bias is not None)
    if impl == "reference":
        return reference_attention(q, k, v, is_sep, rule, doc_ids, scale, dropout_p, bias)
    if impl != "triton":
        _refuse_missing(impl, rule, doc_ids, dropout_p, bias)
    if impl == "compact":
        from megatron.attention.compact import compact_attention
        return compact_attention(q, k, v, is_sep, rule, doc_ids, scale, bias=bias)
    if impl == "triton":
        reason = triton_unavailable(q.device)
        if reason:
            raise RuntimeError(reason)
        _refuse_missing(impl, rule, doc_ids, dropout_p, bias)
        from megatron.attention.triton_sep import triton_sep_attention
        return triton_sep_attention(q, k, v, is_sep, rule, doc_ids, scale)
    # impl == "flex": FlexAttention compiles the compact Sep-Attention layout to Triton on CUDA.
    from megatron.attention.flex import flex_sep_attention
    return flex_sep_attention(q, k, v, is_sep, rule, doc_ids, scale, bias=bias)

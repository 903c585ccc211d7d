"""Elapsed time, ETA, model FLOPs per second per device and MFU for the training log.

Model FLOPs per token follow the standard count: ``6 N`` for the matmuls (N = non-embedding
parameters plus the LM head; forward 2N, backward 4N) plus attention, ``12 x attention width x
seq_length`` per layer (QK^T and AV, forward and backward) with every query counted against the
whole sequence, the Megatron / NeoX convention. Sep-Attention layers count the attention they
actually do: that figure times their kept fraction of causal attention (keys kept per query over
keys a causal query sees, ``megatron.attention.kv_kept_fraction``) on the batch being trained.
Recomputation (activation checkpointing) is not counted: this is model FLOPs, as MFU needs.
MFU divides by ``peak_theoretical_tflops`` or, for bf16/fp16 on a GPU, by the dense tensor-core peak
of the device by name. The report also carries the memory figure (``profiling.memory_figures``: peak
allocated on a GPU since the start, the process's RSS and peak RSS on CPU).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from megatron.attention import SepRule, document_ids, kv_kept_fraction, separator_flags
from megatron.training.profiling import memory_figures, memory_text

# Dense bf16/fp16 tensor-core peaks in TFLOPS per device (vendor data sheets, no sparsity).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0}


def device_peak_tflops(precision: str, device: torch.device) -> Optional[float]:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def kept_fractions(tokens: torch.Tensor, rules: Sequence[SepRule], separator_ids: torch.Tensor,
                   eod_id: Optional[int]) -> List[float]:
    """Per layer: keys kept per query over keys a causal query sees, on ``tokens`` [B, L]."""
    out: List[float] = []
    cache: Dict[SepRule, float] = {}
    for rule in rules:
        if rule.is_full:
            out.append(1.0)
            continue
        if rule not in cache:
            flags = separator_flags(tokens, rule, separator_ids)
            docs = document_ids(tokens, eod_id) if rule.separate_documents and eod_id is not None else None
            cache[rule] = kv_kept_fraction(flags, rule, docs)
        out.append(cache[rule])
    return out


def flops_per_token(matmul_params: int, attention_width: int, seq_length: int, fractions: Sequence[float]) -> float:
    return 6.0 * matmul_params + sum(12.0 * attention_width * seq_length * f for f in fractions)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _human(flops: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return f"{flops:.0f}"


class Throughput:
    """Tracks the run's clock; ``report`` turns a logging window into log fields and metrics."""

    def __init__(self, matmul_params: int, attention_width: int, seq_length: int, tokens_per_iter: int,
                 world_size: int, peak_tflops: Optional[float], start_iteration: int, total_iterations: int,
                 device: Optional[torch.device] = None):
        self.device = device
        self.matmul_params, self.attention_width, self.seq_length = matmul_params, attention_width, seq_length
        self.tokens_per_iter, self.world_size, self.peak = tokens_per_iter, world_size, peak_tflops
        self.start_iteration, self.total = start_iteration, total_iterations
        self.start = time.perf_counter()
        self.train_time = 0.0

    def report(self, iteration: int, window_time: float, window_iters: int,
               fractions: Sequence[float]) -> Dict[str, float]:
        """Metrics of one logging window (``window_time`` seconds of training for ``window_iters``)."""
        self.train_time += window_time
        done = iteration - self.start_iteration
        per_iter = self.train_time / max(1, done)
        flops_iter = flops_per_token(self.matmul_params, self.attention_width, self.seq_length, fractions) \
            * self.tokens_per_iter
        out = {"elapsed_s": time.perf_counter() - self.start, "eta_s": per_iter * (self.total - iteration),
               "flops_per_sec_per_device": flops_iter * window_iters / max(window_time, 1e-12) / self.world_size}
        if self.peak:
            out["mfu"] = out["flops_per_sec_per_device"] / (self.peak * 1e12)
        out.update(memory_figures(self.device))
        return out

    @staticmethod
    def text(stats: Dict[str, float]) -> str:
        parts = [f"FLOPs/s/device {_human(stats['flops_per_sec_per_device'])}"]
        if "mfu" in stats:
            parts.append(f"MFU {100 * stats['mfu']:.1f}%")
        if "peak_memory_gib" in stats or "rss_gib" in stats:
            parts.append(memory_text(stats))
        parts += [f"elapsed {_clock(stats['elapsed_s'])}", f"ETA {_clock(stats['eta_s'])}"]
        return " | ".join(parts)

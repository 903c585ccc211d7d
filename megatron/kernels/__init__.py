"""Fused kernels (Triton on GPU) behind one API, with eager fallbacks that run anywhere.

``fused=None`` means "auto": the Triton kernel when the tensor is on a GPU and Triton imports,
else eager. Triton is imported lazily so a CPU install never needs it.
"""
from megatron.kernels.eager import apply_rotary_qk, layer_norm, rms_norm

__all__ = ["apply_rotary_qk", "layer_norm", "rms_norm"]

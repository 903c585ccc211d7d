"""One transformer layer: attention (with the pluggable Sep-Attention), MLP, norms, residuals.

The layer forward is the only one there is: training, evaluation, pipeline stages and streaming
generation all run it. Streaming inference plugs its bounded KV cache in through
``AttentionInputs.kv_cache`` (see :class:`KVCacheHook`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.attention import SepRule, attend
from megatron.attention.alibi import AlibiBias
from megatron.config.schema import ModelConfig, ffn_width
from megatron.kernels import apply_rotary_qk, layer_norm, rms_norm
from megatron.model.init import ones_init
from megatron.parallel import (
    ColumnParallelLinear,
    ParallelLayout,
    RowParallelLinear,
    mark_sequence_parallel,
    new_parameter,
)
from megatron.parallel.context_parallel import ContextParallelAttention
from megatron.parallel.layers import InitMethod


class KVCacheHook(Protocol):
    """Attention over cached keys/values, for one layer (streaming inference).

    Gets the layer's new, unrotated q [B, L, Hq, D] and k/v [B, L, Hkv, D]; stores k/v, applies the
    positions it manages and returns the attention output [B, L, Hq, D].
    """

    def attend(self, layer: int, rule: SepRule, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """Per-forward data every layer's attention needs, computed once from the tokens."""

    is_sep: Optional[torch.Tensor]  # [B, L] bool, per the base SepLLM mode
    doc_ids: Optional[torch.Tensor]  # [B, L] or None
    cos: Optional[torch.Tensor]  # [B|1, L, rotary_dim // 2]
    sin: Optional[torch.Tensor]
    kv_cache: Optional[KVCacheHook] = None  # streaming inference: the cache does positions and attention
    alibi: Optional[AlibiBias] = None  # pos_emb alibi: this rank's slopes (and BiPE segment positions)
    # Context parallelism: this rank holds a chunk of the sequence (is_sep/doc_ids stay global,
    # cos/sin are the chunk's) and attention exchanges keys with the other cp ranks.
    context_parallel: Optional[ContextParallelAttention] = None


class Norm(nn.Module):
    def __init__(self, hidden: int, kind: str, eps: float, fused: Optional[bool], layout: ParallelLayout,
                 bias: bool = True):
        super().__init__()
        self.kind, self.eps, self.fused = kind, eps, fused
        self.weight = new_parameter(hidden, init_method=ones_init)
        self.bias = new_parameter(hidden) if kind == "layernorm" and bias else None
        if layout.sequence_parallel:
            mark_sequence_parallel(self.weight)
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """norm(x), or with ``residual`` (norm(x + residual), x + residual) from one fused pass."""
        if self.kind == "rmsnorm":
            return rms_norm(x, self.weight, self.eps, residual, fused=self.fused)
        return layer_norm(x, self.weight, self.bias, self.eps, residual, fused=self.fused)


def rotary_dim(m: ModelConfig) -> int:
    return int(m.head_dim * m.rotary_pct) if m.pos_emb == "rotary" else 0


def make_norm(m: ModelConfig, layout: ParallelLayout) -> Norm:
    return Norm(m.hidden_size, m.norm, m.norm_epsilon, m.fused_layernorm, layout, m.use_bias_in_norms)


def ffn_size(m: ModelConfig) -> int:
    """Width of one MLP branch, by NeoX's rule (``megatron.config.schema.mlp_sizes``)."""
    return ffn_width(m)


class SelfAttention(nn.Module):
    """QKV is one column-parallel projection laid out per KV group as [q_1..q_r, k, v] x head_dim,
    so contiguous TP shards hold whole GQA groups (and r = 1 is GPT-NeoX's per-head layout)."""

    def __init__(self, m: ModelConfig, impl: str, layer: int, rule: SepRule, layout: ParallelLayout,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        self.layer, self.rule, self.impl = layer, rule, impl
        self.d = m.head_dim
        self.rotary_dim, self.interleaved, self.fused_rope = rotary_dim(m), m.rotary_interleaved, m.fused_rope
        self.kv_local = m.kv_heads // layout.tp_size
        self.group = m.num_attention_heads // m.kv_heads
        self.qkv = ColumnParallelLinear(m.hidden_size, (m.num_attention_heads + 2 * m.kv_heads) * self.d,
                                        bias=m.use_bias_in_attn_linear, layout=layout, init_method=init_method)
        self.dense = RowParallelLinear(m.num_attention_heads * self.d, m.hidden_size,
                                       bias=m.use_bias_in_attn_linear, layout=layout,
                                       init_method=output_init_method)
        self.dropout = m.attention_dropout

    def project_qkv(self, x: torch.Tensor):
        """x [B, L, H] -> q [B, L, Hq_local, D], k, v [B, L, Hkv_local, D] (before rotary). Under sequence
        parallelism x holds L / tp positions and the projection gathers the whole sequence."""
        y = self.qkv(x)
        B, L = y.shape[:2]
        y = y.view(B, L, self.kv_local, self.group + 2, self.d)
        q = y[:, :, :, : self.group].reshape(B, L, self.kv_local * self.group, self.d)
        return q, y[:, :, :, self.group], y[:, :, :, self.group + 1]

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        B, L = q.shape[:2]
        if inp.kv_cache is not None:
            out = inp.kv_cache.attend(self.layer, self.rule, q, k, v)
        else:
            if self.rotary_dim:
                q, k = apply_rotary_qk(q, k, inp.cos, inp.sin, self.rotary_dim, self.interleaved,
                                       fused=self.fused_rope)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if inp.context_parallel is not None:
                out = inp.context_parallel.attend(q, k, v, self.rule, self.impl).transpose(1, 2)
            else:
                out = attend(q, k, v, inp.is_sep, self.rule, inp.doc_ids, impl=self.impl,
                             dropout_p=self.dropout if self.training else 0.0, bias=inp.alibi).transpose(1, 2)
        return self.dense(out.reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, m: ModelConfig, layout: ParallelLayout, init_method: InitMethod,
                 output_init_method: InitMethod):
        super().__init__()
        ffn = ffn_size(m)
        self.activation = m.activation
        self.fc_in = ColumnParallelLinear(m.hidden_size, ffn, bias=m.use_bias_in_mlp, layout=layout,
                                          init_method=init_method)
        if m.activation == "swiglu":
            self.fc_gate = ColumnParallelLinear(m.hidden_size, ffn, bias=m.use_bias_in_mlp, layout=layout,
                                                init_method=init_method)
        self.fc_out = RowParallelLinear(ffn, m.hidden_size, bias=m.use_bias_in_mlp, layout=layout,
                                        init_method=output_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.activation == "swiglu":
            h = F.silu(self.fc_gate(x)) * h
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.fc_out(h)


class TransformerLayer(nn.Module):
    def __init__(self, m: ModelConfig, impl: str, layer: int, rule: SepRule, layout: ParallelLayout,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        self.parallel_residual = m.gpt_j_residual
        self.input_norm = make_norm(m, layout)
        self.post_attention_norm = make_norm(m, layout)
        self.attention = SelfAttention(m, impl, layer, rule, layout, init_method, output_init_method)
        self.mlp = MLP(m, layout, init_method, output_init_method)
        self.hidden_dropout = m.hidden_dropout

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.hidden_dropout, self.training) if self.hidden_dropout else t
        if self.parallel_residual:
            return x + drop(self.attention(self.input_norm(x), inp)) + drop(self.mlp(self.post_attention_norm(x)))
        normed, h = self.post_attention_norm(drop(self.attention(self.input_norm(x), inp)), residual=x)
        return h + drop(self.mlp(normed))

"""One transformer layer: attention (with the pluggable Sep-Attention), MLP, norms, residuals.

The layer forward is the only one there is: training, evaluation, pipeline stages and streaming
generation all run it. The attention itself is the forward's backend (``AttentionInputs.backend``,
``megatron/attention/backend.py``): the layer projects q/k/v, hands them over and projects the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.attention import SepRule
from megatron.attention.backend import AttentionBackend, LocalAttention
from megatron.config.schema import ModelConfig, ffn_width
from megatron.kernels import layer_norm, rms_norm
from megatron.model.init import ones_init
from megatron.parallel import (
    ColumnParallelLinear,
    ParallelLayout,
    RowParallelLinear,
    mark_sequence_parallel,
    new_parameter,
)
from megatron.parallel.layers import InitMethod


@dataclass
class AttentionInputs:
    """What every layer's attention needs in one forward: the backend that attends, and the tables it
    was built from (separator flags, documents, rotary, ALiBi; None when the backend is the streaming
    cache, which keeps its own)."""

    backend: AttentionBackend
    tables: Optional[LocalAttention] = None

    is_sep = property(lambda self: self.tables.is_sep)
    doc_ids = property(lambda self: self.tables.doc_ids)
    cos = property(lambda self: self.tables.cos)
    sin = property(lambda self: self.tables.sin)
    alibi = property(lambda self: self.tables.alibi)


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

    def __init__(self, m: ModelConfig, layer: int, rule: SepRule, layout: ParallelLayout,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        self.layer, self.rule = layer, rule
        self.d = m.head_dim
        self.kv_local = m.kv_heads // layout.tp_size
        self.group = m.num_attention_heads // m.kv_heads
        self.qkv = ColumnParallelLinear(m.hidden_size, (m.num_attention_heads + 2 * m.kv_heads) * self.d,
                                        bias=m.use_bias_in_attn_linear, layout=layout, init_method=init_method)
        self.dense = RowParallelLinear(m.num_attention_heads * self.d, m.hidden_size,
                                       bias=m.use_bias_in_attn_linear, layout=layout,
                                       init_method=output_init_method)

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
        out = inp.backend.attend(self.layer, self.rule, q, k, v)
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
    def __init__(self, m: ModelConfig, layer: int, rule: SepRule, layout: ParallelLayout,
                 init_method: InitMethod, output_init_method: InitMethod):
        super().__init__()
        self.parallel_residual = m.gpt_j_residual
        self.input_norm = make_norm(m, layout)
        self.post_attention_norm = make_norm(m, layout)
        self.attention = SelfAttention(m, layer, rule, layout, init_method, output_init_method)
        self.mlp = MLP(m, layout, init_method, output_init_method)
        self.hidden_dropout = m.hidden_dropout

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.hidden_dropout, self.training) if self.hidden_dropout else t
        if self.parallel_residual:
            return x + drop(self.attention(self.input_norm(x), inp)) + drop(self.mlp(self.post_attention_norm(x)))
        normed, h = self.post_attention_norm(drop(self.attention(self.input_norm(x), inp)), residual=x)
        return h + drop(self.mlp(normed))

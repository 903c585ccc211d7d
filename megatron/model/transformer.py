"""One transformer layer: attention (with the pluggable Sep-Attention), MLP, norms, residuals."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.attention import SepRule, attend
from megatron.config.schema import Config
from megatron.kernels import apply_rotary_qk, layer_norm, rms_norm
from megatron.parallel import ColumnParallelLinear, RowParallelLinear, get_state, mark_sequence_parallel


@dataclass
class AttentionInputs:
    """Per-forward data every layer's attention needs, computed once from the tokens."""

    is_sep: torch.Tensor  # [B, L] bool, per the base SepLLM mode
    doc_ids: Optional[torch.Tensor]  # [B, L] or None
    cos: Optional[torch.Tensor]  # [B|1, L, rotary_dim // 2]
    sin: Optional[torch.Tensor]


class Norm(nn.Module):
    def __init__(self, hidden: int, kind: str, eps: float, fused: Optional[bool], sequence_parallel: bool = False):
        super().__init__()
        self.kind, self.eps, self.fused = kind, eps, fused
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "layernorm" else None
        if sequence_parallel:
            mark_sequence_parallel(self.weight)
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """norm(x), or with ``residual`` (norm(x + residual), x + residual) from one fused pass."""
        if self.kind == "rmsnorm":
            return rms_norm(x, self.weight, self.eps, residual, fused=self.fused)
        return layer_norm(x, self.weight, self.bias, self.eps, residual, fused=self.fused)


def head_dim(cfg: Config) -> int:
    return cfg.model.hidden_size // cfg.model.num_attention_heads


def rotary_dim(cfg: Config) -> int:
    return int(head_dim(cfg) * cfg.model.rotary_pct) if cfg.model.pos_emb == "rotary" else 0


def sequence_parallel(cfg: Config) -> bool:
    """Activations outside the TP regions are split along the sequence (only meaningful with tp > 1)."""
    return cfg.parallel.sequence_parallel and get_state().tp_size > 1


def make_norm(cfg: Config) -> Norm:
    m = cfg.model
    return Norm(m.hidden_size, m.norm, m.layernorm_epsilon, m.fused_layernorm, sequence_parallel(cfg))


def ffn_size(cfg: Config) -> int:
    m = cfg.model
    if m.intermediate_size:
        return m.intermediate_size
    if m.activation == "swiglu":
        return 64 * math.ceil(8 * m.hidden_size / 3 / 64)
    return 4 * m.hidden_size


class SelfAttention(nn.Module):
    """QKV is one column-parallel projection laid out per KV group as [q_1..q_r, k, v] x head_dim,
    so contiguous TP shards hold whole GQA groups (and r = 1 is GPT-NeoX's per-head layout)."""

    def __init__(self, cfg: Config, layer: int, rule: SepRule):
        super().__init__()
        m, tp = cfg.model, get_state().tp_size
        self.rule, self.impl = rule, cfg.attention.impl
        self.d = head_dim(cfg)
        self.rotary_dim, self.interleaved, self.fused_rope = rotary_dim(cfg), m.rotary_interleaved, m.fused_rope
        self.kv_local = cfg.num_kv_heads // tp
        self.group = m.num_attention_heads // cfg.num_kv_heads
        seed, std, sp = cfg.training.seed, m.init_method_std, sequence_parallel(cfg)
        out_std = std / math.sqrt(2 * m.num_layers)
        self.qkv = ColumnParallelLinear(m.hidden_size, (m.num_attention_heads + 2 * cfg.num_kv_heads) * self.d,
                                        m.use_bias_in_attn_linear, std, seed, f"layers.{layer}.attention.qkv",
                                        sequence_parallel=sp)
        self.dense = RowParallelLinear(m.num_attention_heads * self.d, m.hidden_size, m.use_bias_in_attn_linear,
                                       out_std, seed, f"layers.{layer}.attention.dense", sequence_parallel=sp)
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
        if self.rotary_dim:
            q, k = apply_rotary_qk(q, k, inp.cos, inp.sin, self.rotary_dim, self.interleaved,
                                   fused=self.fused_rope)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), inp.is_sep, self.rule,
                     inp.doc_ids, impl=self.impl)
        return self.dense(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        m = cfg.model
        seed, std, ffn, sp = cfg.training.seed, m.init_method_std, ffn_size(cfg), sequence_parallel(cfg)
        out_std = std / math.sqrt(2 * m.num_layers)
        self.activation = m.activation
        key = f"layers.{layer}.mlp"
        self.fc_in = ColumnParallelLinear(m.hidden_size, ffn, m.use_bias_in_mlp, std, seed, key + ".fc_in",
                                          sequence_parallel=sp)
        if m.activation == "swiglu":
            self.fc_gate = ColumnParallelLinear(m.hidden_size, ffn, m.use_bias_in_mlp, std, seed, key + ".fc_gate",
                                                sequence_parallel=sp)
        self.fc_out = RowParallelLinear(ffn, m.hidden_size, m.use_bias_in_mlp, out_std, seed, key + ".fc_out",
                                        sequence_parallel=sp)

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
    def __init__(self, cfg: Config, layer: int, rule: SepRule):
        super().__init__()
        m = cfg.model
        self.parallel_residual = m.gpt_j_residual
        self.input_norm = make_norm(cfg)
        self.post_attention_norm = make_norm(cfg)
        self.attention = SelfAttention(cfg, layer, rule)
        self.mlp = MLP(cfg, layer)
        self.hidden_dropout = m.hidden_dropout

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.hidden_dropout, self.training) if self.hidden_dropout else t
        if self.parallel_residual:
            return x + drop(self.attention(self.input_norm(x), inp)) + drop(self.mlp(self.post_attention_norm(x)))
        normed, h = self.post_attention_norm(drop(self.attention(self.input_norm(x), inp)), residual=x)
        return h + drop(self.mlp(normed))

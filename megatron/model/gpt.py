"""Decoder-only GPT: embeddings -> transformer layers -> final norm -> LM head.

One class covers GPT-NeoX/Pythia, Llama and GPT-2 by config. The model takes its
:class:`~megatron.config.schema.ModelConfig` and attention settings, and the
:class:`~megatron.parallel.ParallelLayout` of the rank it is built for: the layout decides the
tensor-parallel shard sizes and which layers this rank holds (``layout.layer_ids``); the first
pipeline stage owns the embeddings, the last the final norm, LM head and loss. Construction
allocates; :func:`build_model` also initialises (``megatron/model/init.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megatron.attention import document_ids, separator_flags
from megatron.attention.alibi import AlibiBias, local_alibi_slopes
from megatron.attention.backend import LocalAttention, Rotary
from megatron.config.schema import AttentionConfig, Config, ModelConfig
from megatron.errors import ConfigError
from megatron.model.attention_plan import AttentionPlan, resolve_attention_plan
from megatron.model.bipe import bilevel_positions
from megatron.model.init import init_method_by_name, init_weights
from megatron.model.rotary import RotaryEmbedding
from megatron.model.transformer import AttentionInputs, TransformerLayer, make_norm, rotary_dim
from megatron.parallel import (
    ParallelLayout,
    VocabParallelEmbedding,
    new_parameter,
    parallel_lm_logits,
    vocab_parallel_cross_entropy,
)
from megatron.parallel.mappings import gather_from_tp
from megatron.parallel.sequence import SequenceSharding


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionConfig, vocab_size: int, plan: AttentionPlan,
                 eod_id: Optional[int] = None, layout: ParallelLayout = ParallelLayout()):
        super().__init__()
        m = config
        self.config, self.layout, self.vocab_size, self.eod_id = config, layout, vocab_size, eod_id
        self.pre_process, self.post_process = layout.is_first_stage, layout.is_last_stage
        # Context / sequence parallelism, applied from outside the layers (megatron/parallel/sequence.py).
        self.sequence = SequenceSharding(layout)
        self.impl = attention.impl
        self.rotary_settings = Rotary(rotary_dim(m), m.rotary_interleaved, m.fused_rope)
        sep_ids = plan.separator_list
        self.register_buffer("separator_ids", torch.tensor(sep_ids, dtype=torch.long), persistent=False)
        self.rules, self.base_rule = list(plan.rules), plan.base_rule
        init = init_method_by_name(m.init_method, m.init_method_std, m.num_layers, m.hidden_size)
        out_init = init_method_by_name(m.output_layer_init_method, m.init_method_std, m.num_layers, m.hidden_size)
        self.rotary = RotaryEmbedding(rotary_dim(m), m.rotary_emb_base) if rotary_dim(m) else None
        # ALiBi slopes of this rank's query heads (a contiguous slice of all heads under TP); BiPE's
        # segment separators (default: the Sep-Attention separators).
        # (A list, not a tensor: construction may run under a meta device context.)
        self.alibi_slopes = (local_alibi_slopes(m.num_attention_heads, layout.tp_size, layout.tp_rank)
                             if m.pos_emb == "alibi" else None)
        self.bipe = m.bipe
        bipe_ids = m.bipe_separator_ids if m.bipe_separator_ids is not None else sep_ids
        if m.bipe and not bipe_ids:
            raise ConfigError("bipe: true: BiPE needs separator ids to end segments, but the model has none; "
                              "set bipe_separator_ids or attention.sepllm.separator_ids / separator_tokens")
        self.register_buffer("bipe_separator_ids", torch.tensor(sorted(set(bipe_ids)), dtype=torch.long),
                             persistent=False)
        if self.pre_process:
            self.embed = VocabParallelEmbedding(vocab_size, m.hidden_size, layout=layout, init_method=init)
            # The learned table: token positions (pos_emb learned) or BiPE's intra-segment positions.
            if m.pos_emb == "learned" or m.bipe:
                self.pos_embed = new_parameter(m.max_position_embeddings or m.seq_length, m.hidden_size,
                                               init_method=init)
        # Keyed by global layer index: parameter names are the same under every pipeline split.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(m, i, self.rules[i], layout, init, out_init)
                                     for i in layout.layer_ids(m.num_layers)})
        if self.post_process:
            self.final_norm = make_norm(m, layout)
            if m.no_weight_tying or not self.pre_process:
                # Untied head, or the last pipeline stage's copy of a tied embedding (kept equal
                # to the first stage's by the pipeline engine's embedding-group all-reduce).
                self.lm_head = VocabParallelEmbedding(vocab_size, m.hidden_size, layout=layout, init_method=init)
                if not m.no_weight_tying:
                    self.lm_head.weight.init_key = "embed.weight"
                    self.lm_head.weight.pipeline_duplicate = True  # grad norm counts embed.weight only

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.embed.weight

    def attention_inputs(self, tokens: torch.Tensor,
                         positions: Optional[torch.Tensor] = None) -> AttentionInputs:
        """The attention of one forward over ``tokens`` [B, L] (the whole sequence): separator flags and
        document ids of the whole sequence, RoPE tables of this rank's part, at its positions."""
        B, L = tokens.shape
        self._check_bipe_positions(positions)
        if positions is None:
            positions = torch.arange(L, device=tokens.device)[None]
        is_sep = separator_flags(tokens, self.base_rule, self.separator_ids, positions.expand(B, L))
        docs = None
        if self.base_rule.separate_documents:
            if self.eod_id is None:  # built without a tokenizer (parameter counts, resharding): no forward
                raise ValueError("attention.sepllm.separate_documents needs the tokenizer's EOD id")
            docs = document_ids(tokens, self.eod_id)
        positions = self.sequence.enter(tokens, positions)[1]
        # BiPE: rotary and ALiBi see segment indices; the token positions still drive the Sep rule.
        # (Neither runs under context parallelism: config validation rejects the pairing.)
        segments = bilevel_positions(tokens, self.bipe_separator_ids)[1] if self.bipe else None
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(segments if segments is not None else positions)
        alibi = None
        if self.alibi_slopes is not None:
            alibi = AlibiBias(torch.tensor(self.alibi_slopes, device=tokens.device), segments)
        dropout = self.config.attention_dropout if self.training else 0.0
        tables = LocalAttention(is_sep, docs, cos, sin, alibi, self.impl, dropout, self.rotary_settings)
        return AttentionInputs(self.sequence.attention(tables), tables)

    def _check_bipe_positions(self, positions: Optional[torch.Tensor]) -> None:
        if self.bipe and positions is not None:
            raise ValueError("a BiPE model derives its positions from the tokens; do not pass positions")

    def embed_tokens(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings [B, L, H] of ``tokens`` [B, L]; of this rank's part of the sequence."""
        tokens, positions = self.sequence.enter(tokens, positions)
        h = self.embed(tokens)
        self._check_bipe_positions(positions)
        if self.bipe:
            positions = bilevel_positions(tokens, self.bipe_separator_ids)[0]
        if hasattr(self, "pos_embed"):
            pos = positions if positions is not None else torch.arange(tokens.shape[1], device=tokens.device)
            pos_h = self.pos_embed[pos]
            h = h + self.sequence.to_hidden(pos_h[None] if pos_h.dim() == 2 else pos_h)
        return h

    def run_layers(self, hidden: torch.Tensor, inp: AttentionInputs,
                   layer_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        layers = self.layers.values() if layer_ids is None else [self.layers[str(i)] for i in layer_ids]
        for layer in layers:
            if self.config.checkpoint_activations and self.training:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, inp, use_reentrant=False)
            else:
                hidden = layer(hidden, inp)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits [B, L, V/tp]."""
        return parallel_lm_logits(self.final_norm(hidden), self.output_weight, self.layout)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole model (one pipeline stage): the mean loss with ``labels``, else this rank's
        logit shard. Pipeline stages run ``embed_tokens`` / ``run_layers`` / ``head`` piecewise."""
        hidden = self.run_layers(self.embed_tokens(tokens, positions), self.attention_inputs(tokens, positions))
        logits = self.head(hidden)
        if labels is None:
            return logits
        return lm_loss(logits, self.sequence.chunk(labels), self.layout, self.config.fused_cross_entropy)

    @torch.no_grad()
    def full_logits(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Gathered logits [B, L, V] (inference, single pipeline stage)."""
        return gather_from_tp(self(tokens, positions=positions), self.layout)


def split_batch(batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch of [B, L + 1] token ids -> (inputs [B, L], next-token labels [B, L])."""
    return batch[:, :-1], batch[:, 1:]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, layout: ParallelLayout,
            fused: Optional[bool] = None) -> torch.Tensor:
    """Mean next-token cross entropy of a micro-batch, from this rank's vocabulary shard of the logits
    and the labels of the same positions (under context parallelism this rank's chunk,
    ``GPTModel.sequence.chunk``: the mean is over the chunk and the engines average it over the cp ranks)."""
    return vocab_parallel_cross_entropy(logits, labels, layout, fused=fused).mean()


def micro_batch_loss(model: GPTModel, batch: torch.Tensor) -> torch.Tensor:
    """The training loss of one micro-batch [B, L + 1] through a whole (unpipelined) model."""
    return model(*split_batch(batch))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: Config, vocab_size: int, plan: Union[AttentionPlan, Sequence[int]] = (),
                eod_id: Optional[int] = None, layout: Optional[ParallelLayout] = None,
                device: Optional[str] = None) -> GPTModel:
    """The (initialised) model or pipeline stage of the rank ``layout`` describes (default: one rank).
    ``plan``: the entry path's resolved attention plan (``attention_plan.py``); plain separator ids
    (tests, benchmarks, shape-only builds) are completed by the config. ``device="meta"`` builds
    without memory or initialisation (parameter counts, large configs)."""
    layout = layout or ParallelLayout()
    if not isinstance(plan, AttentionPlan):
        plan = resolve_attention_plan(cfg.model, cfg.attention.sepllm, separator_ids=plan)
    with torch.device(device) if device else contextlib.nullcontext():
        model = GPTModel(cfg.model, cfg.attention, vocab_size, plan, eod_id, layout)
    if device != "meta":
        init_weights(model, cfg.training.seed)
    return model

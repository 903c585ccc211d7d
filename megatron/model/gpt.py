"""Decoder-only GPT: embeddings -> transformer layers -> final norm -> LM head.

One class covers GPT-NeoX/Pythia, Llama and GPT-2 by config. A model can be one pipeline stage:
``pre_process`` owns the embeddings, ``post_process`` the final norm, LM head and loss, and
``layer_range`` the slice of layers it holds.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megatron.attention import document_ids, resolve_layer_rules, separator_flags
from megatron.config.schema import Config
from megatron.model.rotary import RotaryEmbedding
from megatron.model.transformer import AttentionInputs, TransformerLayer, make_norm, rotary_dim, sequence_parallel
from megatron.parallel import (VocabParallelEmbedding, get_state, master_normal,
                               parallel_lm_logits, vocab_parallel_cross_entropy)
from megatron.parallel.mappings import gather_from_tp, scatter_to_sequence_parallel


class GPTModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, separator_ids: Sequence[int] = (),
                 eod_id: Optional[int] = None, pre_process: bool = True, post_process: bool = True,
                 layer_range: Optional[Tuple[int, int]] = None, layer_ids: Optional[Sequence[int]] = None):
        super().__init__()
        m, sep = cfg.model, cfg.attention.sepllm
        self.cfg, self.vocab_size, self.eod_id = cfg, vocab_size, eod_id
        self.pre_process, self.post_process = pre_process, post_process
        if sep.separate_documents and eod_id is None:
            raise ValueError("attention.sepllm.separate_documents needs the tokenizer's EOD id")
        sep_ids = sep.separator_ids if sep.separator_ids is not None else list(separator_ids)
        self.register_buffer("separator_ids", torch.tensor(sorted(set(sep_ids)), dtype=torch.long),
                             persistent=False)
        self.rules = resolve_layer_rules(m.num_layers, sep.mode, sep.n_init, sep.n_local, sep.interval,
                                         sep.separate_documents, sep.full_attention_layers, sep.layer_n_local)
        self.base_rule = self.rules[0].__class__(sep.mode, sep.n_init, sep.n_local, sep.interval,
                                                 sep.separate_documents)
        start, end = layer_range or (0, m.num_layers)
        self.layer_range = (start, end)
        # layer_ids (interleaved pipeline: several non-adjacent chunks per rank) overrides layer_range.
        ids = list(layer_ids) if layer_ids is not None else list(range(start, end))
        seed, std = cfg.training.seed, m.init_method_std
        # Sequence parallelism: hidden states between layers (and pipeline stages) hold L / tp positions.
        self.sequence_parallel = sequence_parallel(cfg)
        self.rotary = RotaryEmbedding(rotary_dim(cfg), m.rotary_emb_base) if rotary_dim(cfg) else None
        if pre_process:
            self.embed = VocabParallelEmbedding(vocab_size, m.hidden_size, std, seed, "embed",
                                                sequence_parallel=self.sequence_parallel)
            if m.pos_emb == "learned":
                max_pos = m.max_position_embeddings or m.seq_length
                self.pos_embed = nn.Parameter(master_normal((max_pos, m.hidden_size), std, seed,
                                                                       "pos_embed.weight"))
        # Keyed by global layer index: parameter names are the same under every pipeline split.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, i, self.rules[i]) for i in ids})
        if post_process:
            self.final_norm = make_norm(cfg)
            if m.no_weight_tying or not pre_process:
                # Untied head, or the last pipeline stage's copy of a tied embedding (kept equal
                # to the first stage's by the pipeline engine's embedding-group all-reduce).
                key = "lm_head" if m.no_weight_tying else "embed"
                self.lm_head = VocabParallelEmbedding(vocab_size, m.hidden_size, std, seed, key)
                if not m.no_weight_tying:
                    self.lm_head.weight.pipeline_duplicate = True  # grad norm counts embed.weight only

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.embed.weight

    def attention_inputs(self, tokens: torch.Tensor,
                         positions: Optional[torch.Tensor] = None) -> AttentionInputs:
        B, L = tokens.shape
        if positions is None:
            positions = torch.arange(L, device=tokens.device)[None]
        is_sep = separator_flags(tokens, self.base_rule, self.separator_ids, positions.expand(B, L))
        docs = document_ids(tokens, self.eod_id) if self.base_rule.separate_documents else None
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions)
        return AttentionInputs(is_sep, docs, cos, sin)

    def embed_tokens(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(tokens)
        if hasattr(self, "pos_embed"):
            pos = positions if positions is not None else torch.arange(tokens.shape[1], device=tokens.device)
            pos_h = self.pos_embed[pos]
            pos_h = pos_h[None] if pos_h.dim() == 2 else pos_h
            h = h + (scatter_to_sequence_parallel(pos_h) if self.sequence_parallel else pos_h)
        return h

    def run_layers(self, hidden: torch.Tensor, inp: AttentionInputs,
                   layer_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        layers = self.layers.values() if layer_ids is None else [self.layers[str(i)] for i in layer_ids]
        for layer in layers:
            if self.cfg.model.checkpoint_activations and self.training:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, inp, use_reentrant=False)
            else:
                hidden = layer(hidden, inp)
        return hidden

    def head(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss [B, L] when labels are given, else this rank's logit shard [B, L, V/tp]."""
        logits = parallel_lm_logits(self.final_norm(hidden), self.output_weight,
                                    sequence_parallel=self.sequence_parallel)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, fused=self.cfg.model.fused_cross_entropy)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stage forward. First stage: tokens -> hidden; last stage: -> mean loss (labels) or logits.

        Later stages get the previous stage's ``hidden_states`` and still need ``tokens``
        (separator flags and document ids come from them).
        """
        inp = self.attention_inputs(tokens, positions)
        hidden = self.embed_tokens(tokens, positions) if self.pre_process else hidden_states
        hidden = self.run_layers(hidden, inp)
        if not self.post_process:
            return hidden
        out = self.head(hidden, labels)
        return out.mean() if labels is not None else out

    @torch.no_grad()
    def full_logits(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Gathered logits [B, L, V] (inference, single pipeline stage)."""
        return gather_from_tp(self(tokens, positions=positions))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: Config, vocab_size: int, separator_ids: Sequence[int] = (),
                eod_id: Optional[int] = None) -> GPTModel:
    """The model (or this rank's pipeline stage) for the current parallel state. With
    ``virtual_pipe_stages`` v > 1 a rank holds v chunks: chunk c is pipeline stage c * pp + pp_rank."""
    st = get_state()
    chunks = cfg.parallel.virtual_pipe_stages if st.pp_size > 1 else 1
    per_chunk = cfg.model.num_layers // (st.pp_size * chunks)
    ids = [i for c in range(chunks) for i in range((c * st.pp_size + st.pp_rank) * per_chunk,
                                                   (c * st.pp_size + st.pp_rank + 1) * per_chunk)]
    return GPTModel(cfg, vocab_size, separator_ids, eod_id, pre_process=st.is_first_stage,
                    post_process=st.is_last_stage, layer_range=(ids[0], ids[-1] + 1), layer_ids=ids)

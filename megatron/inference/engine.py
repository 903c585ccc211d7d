"""Streaming decoding: drives a GPTModel's sub-modules over a bounded KV cache (batch size 1).

The model's own forward recomputes attention over the whole sequence; here every layer is run
piece by piece: project q/k/v for the new tokens, store k/v (unrotated) in the cache, rotate all
keys by their stream position (or by their place in the cache under positional shift), attend,
then the layer's output projection, MLP and residuals exactly as ``TransformerLayer.forward``.

Attention inside the cache (``CacheConfig.decode_mask``):
  * ``cache`` -- a query sees every cached key plus the new tokens before it (reference behaviour);
  * ``rule``  -- a query sees the keys its layer's Sep-Attention rule allows, judged by stream
    positions: ``j < n_init`` or ``is_sep[j]`` or ``i - j < n_local``.
With ``rule``, no positional shift, ``init_cache_size >= n_init``, ``local_size >= n_local - 1`` and a
separator region large enough for every separator seen, compression only drops keys the rule already
hides, so streaming equals the model's full forward with the Sep-Attention mask, compression or not.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megatron.attention.sepllm_rule import SepRule, visible
from megatron.inference.errors import InferenceError
from megatron.inference.kv_cache import CacheConfig, StreamingKVCache
from megatron.kernels.eager import rotate
from megatron.model.gpt import GPTModel
from megatron.parallel import get_state

TokenInput = Union[Sequence[int], torch.Tensor]


class StreamingEngine:
    def __init__(self, model: GPTModel, cache: CacheConfig,
                 separator_ids: Optional[Sequence[int]] = None):
        if get_state().tp_size != 1:
            raise InferenceError("streaming inference runs unsharded (tensor parallel size 1); merge the "
                                 "checkpoint's shards first")
        if not (model.pre_process and model.post_process) or len(model.layers) != model.cfg.model.num_layers:
            raise InferenceError("streaming inference needs the whole model (one pipeline stage)")
        self.model = model.eval()
        self.config = cache
        m = model.cfg.model
        self.device = model.output_weight.device
        self.dtype = model.output_weight.dtype
        ids = model.separator_ids if separator_ids is None else torch.tensor(list(separator_ids), dtype=torch.long)
        self.separator_ids = ids.to(self.device)
        self.layer_ids = [int(k) for k in model.layers.keys()]
        self.rules: Dict[int, SepRule] = {i: model.rules[i] for i in self.layer_ids}
        if cache.decode_mask == "rule" and model.base_rule.separate_documents:
            raise InferenceError("decode_mask 'rule' does not support attention.sepllm.separate_documents")
        self.max_learned_position = None
        if hasattr(model, "pos_embed"):
            self.max_learned_position = model.pos_embed.shape[0]
            if cache.enable_pos_shift and cache.policy != "full" and cache.cache_size > self.max_learned_position:
                raise InferenceError(f"cache_size {cache.cache_size} exceeds the {self.max_learned_position} "
                                     "learned positions of this model; positional shift needs cache_size <= "
                                     "max_position_embeddings")
        first = model.layers[str(self.layer_ids[0])].attention
        self.kv_heads, self.head_dim = first.kv_local, first.d
        self.rotary_dim, self.interleaved = first.rotary_dim, first.interleaved
        self._rope_table: Optional[tuple] = None
        self.last_key_positions: Optional[torch.Tensor] = None  # rotary positions of the last forward
        self.last_query_positions: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        """Forget the stream: a fresh, empty cache."""
        self.cache = StreamingKVCache(self.config, self.layer_ids, self.kv_heads, self.head_dim,
                                      self.dtype, self.device)
        self.stream_position = 0

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def forward(self, tokens: TokenInput, all_logits: bool = False,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """Append ``tokens`` to the stream (prefill when several, decoding when one).

        Returns the logits of the last token [V], or of every token [L, V] with ``all_logits``.
        Tokens are fed in pieces of at most ``chunk_size`` and at most what fits the cache budget.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).flatten()
        if tokens.numel() == 0:
            raise InferenceError("empty input: nothing to prefill or decode (give at least one token)")
        if chunk_size is not None and chunk_size < 1:
            raise InferenceError(f"chunk_size must be >= 1, got {chunk_size}")
        limit = self.config.max_new_per_forward
        piece = min(chunk_size or tokens.numel(), limit or tokens.numel())
        outputs: List[torch.Tensor] = []
        for start in range(0, tokens.numel(), piece):
            hidden = self._forward_piece(tokens[start:start + piece])
            if all_logits:
                outputs.append(self._logits(hidden)[0])
            elif start + piece >= tokens.numel():
                outputs.append(self._logits(hidden[:, -1:])[0])
        out = torch.cat(outputs, dim=0)
        return out if all_logits else out[-1]

    def step(self, token: int) -> torch.Tensor:
        """Decode one token; logits [V] of the next one."""
        return self.forward([token])

    # ------------------------------------------------------------------ internals
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden).float()

    def _rotary(self, positions: torch.Tensor):
        return self.model.rotary(positions[None])

    def _shifted_rotary(self, length: int):
        """cos/sin for places 0..length-1, from a table that grows on demand."""
        if self._rope_table is None or self._rope_table[0].shape[1] < length:
            size = max(length, self.config.cache_size if self.config.policy != "full" else 1024)
            self._rope_table = self._rotary(torch.arange(size, device=self.device))
        cos, sin = self._rope_table
        return cos[:, :length], sin[:, :length]

    def _key_flags(self, rule: SepRule, key_pos: torch.Tensor, key_sep: torch.Tensor) -> torch.Tensor:
        if rule.mode == "streamingllm":
            return torch.zeros_like(key_sep)
        if rule.mode == "fixed_interval":
            return key_pos % rule.interval == rule.interval - 1
        return key_sep

    def _masks(self, q_pos: torch.Tensor, key_pos: torch.Tensor, key_sep: torch.Tensor
               ) -> Dict[SepRule, Optional[torch.Tensor]]:
        """Boolean attention mask [L, n + L] per distinct layer rule (None = attend to all)."""
        causal = None if q_pos.numel() == 1 else key_pos[None, :] <= q_pos[:, None]
        masks: Dict[SepRule, Optional[torch.Tensor]] = {}
        for rule in set(self.rules.values()):
            if self.config.decode_mask == "cache" or rule.is_full:
                masks[rule] = causal
            else:
                masks[rule] = visible(q_pos[:, None], key_pos[None, :], self._key_flags(rule, key_pos, key_sep)[None, :],
                                      rule.n_init, rule.n_local)
        return masks

    def _forward_piece(self, tokens: torch.Tensor) -> torch.Tensor:
        cache, cfg = self.cache, self.config
        L = tokens.numel()
        cache.make_room(L)
        n = cache.length
        stream_pos = torch.arange(self.stream_position, self.stream_position + L, device=self.device)
        places = torch.arange(n, n + L, device=self.device)
        is_sep = torch.isin(tokens, self.separator_ids)
        embed_pos = places if cfg.enable_pos_shift else stream_pos
        if self.max_learned_position is not None and int(embed_pos[-1]) >= self.max_learned_position:
            raise InferenceError(f"position {int(embed_pos[-1])} is beyond the {self.max_learned_position} learned "
                                 "positions of this model; enable positional shift with a bounded cache")
        hidden = self.model.embed_tokens(tokens[None], embed_pos[None])

        key_pos = torch.cat([cache.positions[:n], stream_pos])
        key_sep = torch.cat([cache.is_sep[:n], is_sep])
        masks = self._masks(stream_pos, key_pos, key_sep)
        cos_k = sin_k = cos_q = sin_q = None
        if self.rotary_dim:
            rope_pos = torch.arange(n + L, device=self.device) if cfg.enable_pos_shift else key_pos
            if cfg.enable_pos_shift:
                cos_k, sin_k = self._shifted_rotary(n + L)
            else:
                cos_k, sin_k = self._rotary(key_pos)
            cos_q, sin_q = cos_k[:, n:], sin_k[:, n:]
            self.last_key_positions, self.last_query_positions = rope_pos, rope_pos[n:]

        for layer_id in self.layer_ids:
            layer = self.model.layers[str(layer_id)]
            att = layer.attention
            q, k, v = att.project_qkv(layer.input_norm(hidden))
            keys, values = cache.write(layer_id, k, v)
            if self.rotary_dim:
                q = rotate(q, cos_q, sin_q, self.rotary_dim, self.interleaved)
                keys = rotate(keys, cos_k, sin_k, self.rotary_dim, self.interleaved)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=masks[self.rules[layer_id]],
                                                 enable_gqa=att.group > 1)
            attn = att.dense(out.transpose(1, 2).reshape(1, L, -1))
            if layer.parallel_residual:
                hidden = hidden + attn + layer.mlp(layer.post_attention_norm(hidden))
            else:
                hidden = hidden + attn
                hidden = hidden + layer.mlp(layer.post_attention_norm(hidden))
        cache.commit(tokens, stream_pos, is_sep)
        self.stream_position += L
        return hidden

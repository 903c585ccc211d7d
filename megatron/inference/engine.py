"""Streaming decoding: a GPTModel over a bounded KV cache (batch size 1).

Each piece of new tokens runs through the model's own layers (``GPTModel.run_layers``, the one
``TransformerLayer.forward``); the attention of every layer is handed to this engine, the forward's
attention backend (``AttentionInputs.backend``, ``megatron/attention/backend.py``): store the new k/v
(unrotated) in the cache, rotate all keys by their stream position (or by their place in the cache under
positional shift), attend.

Attention inside the cache (``CacheConfig.decode_mask``):
  * ``cache`` -- a query sees every cached key plus the new tokens before it (reference behaviour);
  * ``rule``  -- a query sees the keys its layer's Sep-Attention rule allows, judged by stream
    positions: ``j < n_init`` or ``is_sep[j]`` or ``i - j < n_local``.
With ``rule``, no positional shift, ``init_cache_size >= n_init``, ``local_size >= n_local - 1`` and a
separator region large enough for every separator seen, compression only drops keys the rule already
hides, so streaming equals the model's full forward with the Sep-Attention mask, compression or not.

ALiBi models measure distances the way rotary models rotate: in stream positions, or in places in the
cache under positional shift. BiPE models are refused (their segment positions are not tracked here).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megatron.attention.sepllm_rule import SepRule, visible
from megatron.errors import InferenceError
from megatron.inference.kv_cache import CacheConfig, StreamingKVCache
from megatron.kernels.eager import rotate
from megatron.model.gpt import GPTModel
from megatron.model.transformer import AttentionInputs

TokenInput = Union[Sequence[int], torch.Tensor]


class StreamingEngine:
    def __init__(self, model: GPTModel, cache: CacheConfig,
                 separator_ids: Optional[Sequence[int]] = None):
        if model.layout.tp_size != 1:
            raise InferenceError("streaming inference runs unsharded (tensor parallel size 1); merge the "
                                 "checkpoint's shards first")
        if not (model.pre_process and model.post_process) or len(model.layers) != model.config.num_layers:
            raise InferenceError("streaming inference needs the whole model (one pipeline stage)")
        if model.bipe:
            raise InferenceError("streaming inference does not support BiPE models (bipe: true): the cache does "
                                 "not track segment positions; evaluate them with a full forward instead")
        self.model = model.eval()
        self.config = cache
        self.device = model.output_weight.device
        self.dtype = model.output_weight.dtype
        ids = model.separator_ids if separator_ids is None else torch.tensor(list(separator_ids), dtype=torch.long)
        self.separator_ids = ids.to(self.device)
        # Lookup table id -> is separator: one gather per step instead of torch.isin.
        self.separator_table = torch.zeros(max(model.vocab_size, int(ids.max()) + 1 if ids.numel() else 0),
                                           dtype=torch.bool, device=self.device)
        self.separator_table[self.separator_ids] = True
        # A FixLLM model (fixed_interval) keeps every interval-th position instead of separator ids.
        self.fixed_interval = (model.base_rule.interval if model.base_rule.mode == "fixed_interval"
                               and separator_ids is None else None)
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
        self.rotary_dim, self.interleaved = model.rotary_settings.dim, model.rotary_settings.interleaved
        self._rope_table: Optional[tuple] = None
        self.reset()

    def reset(self) -> None:
        """Forget the stream: a fresh, empty cache."""
        self.cache = StreamingKVCache(self.config, self.layer_ids, self.kv_heads, self.head_dim,
                                      self.dtype, self.device, rotary=bool(self.rotary_dim))
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

    def _rope(self, positions: torch.Tensor):
        """cos/sin [1, len, rotary_dim // 2] for positions; places under positional shift come from a
        table (they never exceed the cache size), stream positions are computed."""
        if not self.config.enable_pos_shift:
            return self.model.rotary(positions[None])
        top = int(positions.max()) + 1 if positions.numel() else 0
        if self._rope_table is None or self._rope_table[0].shape[1] < top:
            size = max(top, self.config.cache_size if self.config.policy != "full" else 2 * top)
            self._rope_table = self.model.rotary(torch.arange(size, device=self.device)[None])
        cos, sin = self._rope_table
        return cos[:, positions], sin[:, positions]

    def _key_flags(self, rule: SepRule, key_pos: torch.Tensor, key_sep: torch.Tensor) -> torch.Tensor:
        if rule.mode == "streamingllm":
            return torch.zeros_like(key_sep)
        if rule.mode == "fixed_interval":
            return key_pos % rule.interval == rule.interval - 1
        return key_sep

    def _masks(self, q_pos: torch.Tensor, n: int, new_is_sep: torch.Tensor) -> Dict[SepRule, Optional[torch.Tensor]]:
        """Boolean attention mask [L, n + L] per distinct layer rule (None = attend to all)."""
        rule_layers = self.config.decode_mask == "rule" and any(not r.is_full for r in self.rules.values())
        if q_pos.numel() == 1 and not rule_layers:
            return {rule: None for rule in set(self.rules.values())}
        key_pos = torch.cat([self.cache.positions[:n], q_pos])
        key_sep = torch.cat([self.cache.is_sep[:n], new_is_sep])
        causal = None if q_pos.numel() == 1 else key_pos[None, :] <= q_pos[:, None]
        masks: Dict[SepRule, Optional[torch.Tensor]] = {}
        for rule in set(self.rules.values()):
            if self.config.decode_mask == "cache" or rule.is_full:
                masks[rule] = causal
            else:
                flags = self._key_flags(rule, key_pos, key_sep)
                masks[rule] = visible(q_pos[:, None], key_pos[None, :], flags[None, :], rule.n_init, rule.n_local)
        return masks

    def _forward_piece(self, tokens: torch.Tensor) -> torch.Tensor:
        cache, cfg = self.cache, self.config
        L = tokens.numel()
        cache.make_room(L)
        n = cache.length
        stream_pos = torch.arange(self.stream_position, self.stream_position + L, device=self.device)
        places = torch.arange(n, n + L, device=self.device)
        if self.fixed_interval:
            is_sep = stream_pos % self.fixed_interval == self.fixed_interval - 1
        else:
            is_sep = self.separator_table[tokens]
        embed_pos = places if cfg.enable_pos_shift else stream_pos
        if self.max_learned_position is not None and int(embed_pos[-1]) >= self.max_learned_position:
            raise InferenceError(f"position {int(embed_pos[-1])} is beyond the {self.max_learned_position} learned "
                                 "positions of this model; enable positional shift with a bounded cache")
        hidden = self.model.embed_tokens(tokens[None], embed_pos[None])
        masks = self._masks(stream_pos, n, is_sep)

        piece = _PieceAttention(self, masks, n, embed_pos)
        hidden = self.model.run_layers(hidden, AttentionInputs(piece))
        cache.commit(tokens, stream_pos, is_sep, piece.rotary_positions)
        self.stream_position += L
        return hidden


class _PieceAttention:
    """The KV-cache hook of one forward piece: every layer's attention over the cache plus the new
    tokens (an attention backend, ``megatron/attention/backend.py``)."""

    def __init__(self, engine: StreamingEngine, masks: Dict[SepRule, Optional[torch.Tensor]], n: int,
                 embed_pos: torch.Tensor):
        self.engine, self.masks, self.n, self.L = engine, masks, n, embed_pos.numel()
        cache, cfg = engine.cache, engine.config
        if engine.model.alibi_slopes is not None:
            self.masks = self._with_alibi(masks, embed_pos, n)
        self.rope_new = self.rope_stale = self.rotary_positions = None
        self.stale = cache.rotated_valid
        if engine.rotary_dim:
            # Entries [stale, n) moved since they were rotated (eviction under positional shift).
            dev = embed_pos.device
            old_pos = (torch.arange(self.stale, n, device=dev) if cfg.enable_pos_shift
                       else cache.positions[self.stale:n])
            self.rotary_positions = torch.cat([old_pos, embed_pos])
            self.rope_new = engine._rope(embed_pos)
            self.rope_stale = engine._rope(old_pos) if self.stale < n else None

    def _with_alibi(self, masks: Dict[SepRule, Optional[torch.Tensor]], embed_pos: torch.Tensor,
                    n: int) -> Dict[SepRule, torch.Tensor]:
        """Float masks [Hq, L, n + L]: ALiBi by stream position (by place in the cache under positional
        shift, where ``embed_pos`` are places), -inf where the boolean mask hides a key."""
        eng = self.engine
        dev = embed_pos.device
        old = torch.arange(n, device=dev) if eng.config.enable_pos_shift else eng.cache.positions[:n]
        key_pos = torch.cat([old, embed_pos]).float()
        slopes = torch.tensor(eng.model.alibi_slopes, device=dev)
        bias = -slopes[:, None, None] * (embed_pos.float()[None, :, None] - key_pos[None, None, :])
        return {rule: (bias if m is None else bias.masked_fill(~m, float("-inf"))).to(eng.dtype)
                for rule, m in masks.items()}

    def attend(self, layer: int, rule: SepRule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        eng, cache = self.engine, self.engine.cache
        k_rot = None
        if eng.rotary_dim:
            q = rotate(q, *self.rope_new, eng.rotary_dim, eng.interleaved)
            k_rot = rotate(k, *self.rope_new, eng.rotary_dim, eng.interleaved)
            if self.rope_stale is not None:
                cache.rerotate(layer, self.stale,
                               lambda raw: rotate(raw, *self.rope_stale, eng.rotary_dim, eng.interleaved))
        cache.write(layer, k, v, k_rot)
        keys, values = cache.attention_kv(layer, self.n + self.L)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=self.masks[rule], enable_gqa=q.shape[2] != keys.shape[2])
        return out.transpose(1, 2)

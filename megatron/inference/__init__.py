"""Streaming inference: the bounded Streaming-SepLLM KV cache, decoding engine, sampling, loading.

    from megatron.inference import CacheConfig, StreamingEngine
    engine = StreamingEngine(model, CacheConfig("sepllm", init_cache_size=4, sep_cache_size=64,
                                                local_size=256, cache_size=800))
    logits = engine.forward(prompt_ids)          # prefill (split to fit the budget), logits of the last token
    logits = engine.step(next_id)                # one-token decoding
    engine.cache.kept_positions(), engine.cache.region_sizes()

Policies: ``sepllm`` (initial + separators + past/local windows, compressed at the budget),
``streamingllm`` (initial + most recent ``cache_size - init_cache_size``), ``full`` (no eviction).
Batch size 1 (every stream compresses at its own moments). Needs tensor-parallel size 1.

Relation to the training-time rule (``n_init``, ``n_local``): with ``decode_mask="rule"``, no positional
shift, ``init_cache_size >= n_init``, ``local_size >= n_local - 1`` (the window counts the query itself,
and after a compression the cache still holds the last ``local_size`` tokens before the query) and a
separator region that never overflows, streaming equals the model's full Sep-Attention forward even
across compressions: compression only evicts keys the rule already hides. With the reference
behaviour (``decode_mask="cache"``) query i attends to exactly the entries kept at step i; for
``streamingllm`` that is the rule with no separators, ``n_init = a`` and ``n_local = c - a``.
Positional shift makes rotary (or learned) positions the places in the cache, so they stay below
``cache_size``; keys are cached unrotated and re-rotated only when eviction moves them.
"""
from megatron.inference.engine import StreamingEngine
from megatron.inference.kv_cache import DECODE_MASKS, POLICIES, CacheConfig, StreamingKVCache
from megatron.inference.sampling import SamplingConfig, sample_next_token

__all__ = ["StreamingEngine", "CacheConfig", "StreamingKVCache", "POLICIES", "DECODE_MASKS",
           "SamplingConfig", "sample_next_token"]

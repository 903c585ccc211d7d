"""Streaming inference: the bounded Streaming-SepLLM KV cache, decoding engine, sampling, loading."""
from megatron.inference.engine import StreamingEngine
from megatron.inference.errors import InferenceError
from megatron.inference.kv_cache import DECODE_MASKS, POLICIES, CacheConfig, StreamingKVCache

__all__ = ["StreamingEngine", "InferenceError", "CacheConfig", "StreamingKVCache", "POLICIES", "DECODE_MASKS"]

"""SepLLM model classes for transformers' remote code (``auto_map`` in an exported config.json).

Each class is the stock transformers class with Sep-Attention installed (see ``sepllm_attach``):
logits follow the Sep-Attention rule the model was trained with, and ``generate`` uses the bounded
Streaming-SepLLM cache of config.json 'sepllm.cache' unless given another cache.

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

This file is shipped inside exported model directories: it imports only transformers and the
files next to it.
"""
from transformers import FalconForCausalLM, GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM

from .sepllm_attach import SepLLMMixin, enable_sepllm  # noqa: F401
from .sepllm_cache import SepLLMCache  # noqa: F401


class SepLLMGPTNeoXForCausalLM(SepLLMMixin, GPTNeoXForCausalLM):
    pass


class SepLLMLlamaForCausalLM(SepLLMMixin, LlamaForCausalLM):
    pass


class SepLLMGPT2LMHeadModel(SepLLMMixin, GPT2LMHeadModel):
    pass


class SepLLMFalconForCausalLM(SepLLMMixin, FalconForCausalLM):
    pass


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


def load_weights_like_the_stock_classes() -> None:
    """transformers 5 renames checkpoint keys on load per class (GPT-NeoX's untied head: the file's
    ``embed_out`` is the model's ``lm_head``) but skips those renames for remote-code classes, which
    would leave the head at its random initialisation. Register each stock class's renames under our
    class name. transformers 4 has no renames: its classes use the file's names as they are."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        return
    for ours in (SepLLMGPTNeoXForCausalLM, SepLLMLlamaForCausalLM, SepLLMGPT2LMHeadModel, SepLLMFalconForCausalLM):
        stock = ours.__mro__[2]
        renames = get_checkpoint_conversion_mapping(stock.__name__)  # per-model_type ones reach the stock base model
        if renames:
            register_checkpoint_conversion_mapping(ours.__name__, renames, overwrite=True)


load_weights_like_the_stock_classes()

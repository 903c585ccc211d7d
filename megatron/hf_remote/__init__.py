"""SepLLM inside stock transformers: the code an HF export ships next to its weights.

* ``modeling_sepllm``  -- the classes config.json's ``auto_map`` names (stock class + Sep-Attention);
* ``sepllm_attach``    -- the hooks that give a transformers model our Sep-Attention rule, and
                          ``enable_sepllm`` for training-free SepLLM on any supported HF model;
* ``sepllm_cache``     -- the bounded Streaming-SepLLM ``Cache`` for ``generate``;
* ``sepllm_rule``      -- in an export, a verbatim copy of ``megatron/attention/sepllm_rule.py``.

Apart from ``sepllm_rule`` (a stand-in here) these modules import only torch and transformers,
so an exported directory works without this package.
"""
from megatron.hf_remote.sepllm_attach import SepLLMSettings, enable_sepllm, separator_ids_from_tokenizer
from megatron.hf_remote.sepllm_cache import CacheBudget, SepLLMCache

# Files written into an export, and where each comes from (relative to the megatron package).
EXPORT_FILES = {"modeling_sepllm.py": "hf_remote/modeling_sepllm.py",
                "sepllm_attach.py": "hf_remote/sepllm_attach.py",
                "sepllm_cache.py": "hf_remote/sepllm_cache.py",
                "sepllm_rule.py": "attention/sepllm_rule.py"}

__all__ = ["CacheBudget", "EXPORT_FILES", "SepLLMCache", "SepLLMSettings", "enable_sepllm",
           "separator_ids_from_tokenizer"]

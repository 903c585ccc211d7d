"""SepLLM inside stock transformers: the code an HF export ships next to its weights.

* ``modeling_sepllm``  -- the classes config.json's ``auto_map`` names (stock class + Sep-Attention);
* ``sepllm_attach``    -- the hooks that give a transformers model our Sep-Attention rule, and
                          ``enable_sepllm`` for training-free SepLLM on any supported HF model;
* ``sepllm_cache``     -- the bounded Streaming-SepLLM ``Cache`` for ``generate``;
* ``sepllm_budget``    -- its budget and eviction policy, shared with our own streaming engine;
* ``stream_ledger``    -- the per-entry bookkeeping of both caches (positions, token ids, separators);
* ``sepllm_rule``      -- in an export, a verbatim copy of ``megatron/attention/sepllm_rule.py``.

Apart from ``sepllm_rule`` (a stand-in here) these modules import only torch and transformers
(``sepllm_budget`` and ``stream_ledger`` only torch), so
an exported directory works without this package. Importing this package itself needs neither
(names load on first use), so the exporter can read ``EXPORT_FILES`` without transformers.

    from megatron.hf_remote import enable_sepllm
    enable_sepllm(model, n_init=4, n_local=256, tokenizer=tokenizer)
"""
import importlib

# Files written into an export, and where each comes from (relative to the megatron package).
EXPORT_FILES = {"modeling_sepllm.py": "hf_remote/modeling_sepllm.py",
                "sepllm_attach.py": "hf_remote/sepllm_attach.py",
                "sepllm_cache.py": "hf_remote/sepllm_cache.py",
                "sepllm_budget.py": "hf_remote/sepllm_budget.py",
                "stream_ledger.py": "hf_remote/stream_ledger.py",
                "sepllm_rule.py": "attention/sepllm_rule.py"}

_LAZY = {"enable_sepllm": "sepllm_attach", "separator_ids_from_tokenizer": "sepllm_attach",
         "SepLLMSettings": "sepllm_attach", "SepLLMCache": "sepllm_cache", "CacheBudget": "sepllm_budget"}

__all__ = ["EXPORT_FILES", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

from megatron.attention.dispatch import IMPLS, attend
from megatron.attention.sepllm_rule import (SepRule, dense_mask, document_ids, kv_kept_fraction,
                                            kv_kept_per_query, resolve_layer_rules, separator_flags)

__all__ = ["IMPLS", "attend", "SepRule", "dense_mask", "document_ids", "kv_kept_fraction",
           "kv_kept_per_query", "resolve_layer_rules", "separator_flags"]

"""Sep-Attention: the rule (sepllm_rule.py) and the kernels that implement it, chosen by ``attend``."""
from megatron.attention.compact import compact_attention
from megatron.attention.dispatch import IMPLS, attend
from megatron.attention.sepllm_rule import (
                                            SepRule,
                                            dense_mask,
                                            document_ids,
                                            kv_kept_fraction,
                                            kv_kept_per_query,
                                            resolve_layer_rules,
                                            separator_flags,
)

__all__ = ["IMPLS", "attend", "compact_attention", "SepRule", "dense_mask", "document_ids", "kv_kept_fraction",
           "kv_kept_per_query", "resolve_layer_rules", "separator_flags"]

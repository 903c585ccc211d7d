"""Parallelism: the explicit per-rank layout, tensor-parallel layers and collectives, gradient sync."""
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import (
                                      ColumnParallelLinear,
                                      RowParallelLinear,
                                      VocabParallelEmbedding,
                                      mark_sequence_parallel,
                                      new_parameter,
                                      parallel_lm_logits,
)
from megatron.parallel.layout import ParallelLayout, initialize_model_parallel, layout_for_rank, layout_from_config

__all__ = ["vocab_parallel_cross_entropy", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "mark_sequence_parallel", "new_parameter", "parallel_lm_logits",
           "ParallelLayout", "initialize_model_parallel", "layout_for_rank", "layout_from_config"]

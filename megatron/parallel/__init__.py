from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      mark_sequence_parallel, master_normal, parallel_lm_logits)
from megatron.parallel.state import ParallelState, get_state, initialize_model_parallel, reset_state

__all__ = ["vocab_parallel_cross_entropy", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "mark_sequence_parallel", "master_normal", "parallel_lm_logits", "ParallelState", "get_state",
           "initialize_model_parallel", "reset_state"]

"""The decoder model: GPT-NeoX / Llama / GPT-2 families in one class, built per parallel layout."""
from megatron.model.gpt import GPTModel, build_model, lm_loss, micro_batch_loss, num_parameters, split_batch
from megatron.model.init import init_weights

__all__ = ["GPTModel", "build_model", "init_weights", "lm_loss", "micro_batch_loss", "num_parameters",
           "split_batch"]

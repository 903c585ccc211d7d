"""Tokenizers: ``build_tokenizer(type, vocab_file, merge_file)`` and Megatron vocab padding."""
from megatron.tokenizer.tokenizer import (
                                          HFTokenizer,
                                          SPMTokenizer,
                                          Tokenizer,
                                          build_tokenizer,
                                          padded_vocab_size,
                                          tokenizer_from_path,
)

__all__ = ["Tokenizer", "HFTokenizer", "SPMTokenizer", "build_tokenizer", "padded_vocab_size",
           "tokenizer_from_path"]

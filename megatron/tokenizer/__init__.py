"""Tokenizers: ``build_tokenizer(type, vocab_file, merge_file)`` and Megatron vocab padding."""
from megatron.tokenizer.tokenizer import (
                                          TOKENIZER_TYPES,
                                          CharLevelTokenizer,
                                          HFTokenizer,
                                          SPMTokenizer,
                                          Tokenizer,
                                          build_tokenizer,
                                          padded_vocab_size,
                                          tokenizer_from_path,
)

__all__ = ["Tokenizer", "TOKENIZER_TYPES", "CharLevelTokenizer", "HFTokenizer", "SPMTokenizer", "build_tokenizer",
           "padded_vocab_size", "tokenizer_from_path"]

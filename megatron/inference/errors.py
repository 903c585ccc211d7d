"""The one user-facing error type of the inference package (CLIs print it as one line, exit 2)."""
from __future__ import annotations


class InferenceError(ValueError):
    """Bad inference input: cache budget, prompt, checkpoint, tokenizer or sampling settings."""

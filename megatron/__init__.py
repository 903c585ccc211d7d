"""SepLLM-NeoX: GPT-NeoX-style distributed pretraining with SepLLM Sep-Attention (docs/ARCHITECTURE.md)."""

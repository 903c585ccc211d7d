#!/usr/bin/env python
"""Print docs/neox_compat.md, the table of GPT-NeoX / SepLLM config keys, from the code's rule table:
``python tools/neox_compat_table.py > docs/neox_compat.md``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.config.neox_compat import markdown_table  # noqa: E402

if __name__ == "__main__":
    print(markdown_table(), end="")

#!/usr/bin/env python
"""Print docs/neox_compat.md, the table of GPT-NeoX / SepLLM config keys, from the code's rule table:
``python tools/neox_compat_table.py > docs/neox_compat.md``."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.config.neox_compat import markdown_table  # noqa: E402
from megatron.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    print(markdown_table(), end="")
    return 0


if __name__ == "__main__":
    run_cli(main)

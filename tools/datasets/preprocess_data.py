#!/usr/bin/env python
"""GPT-NeoX's path and defaults for tools/preprocess_data.py (one implementation; this only sets NeoX's
defaults: --tokenizer-type required, no end-of-document token unless --append-eod). NeoX's README:

    python tools/datasets/preprocess_data.py --input ./data/mydataset.jsonl.zst \\
        --output-prefix ./data/mydataset --vocab ./data/gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --dataset-impl mmap --tokenizer-type GPT2BPETokenizer --append-eod

writes ./data/mydataset_text_document.bin/.idx (one dataset per --jsonl-keys key). See
tools/preprocess_data.py --help for every flag.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from preprocess_data import main  # noqa: E402  (tools/preprocess_data.py)

from megatron.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda argv: main(argv, neox=True))

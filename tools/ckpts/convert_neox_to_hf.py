#!/usr/bin/env python
"""GPT-NeoX's path for tools/ckpts/convert_to_hf.py (one implementation), with NeoX's flags:

    python tools/ckpts/convert_neox_to_hf.py --input_dir checkpoints/run/global_step300 \\
        --config_file my_config.yml --output_dir hf_model --precision auto --architecture neox

--architecture neox / llama (mistral is refused); --config_file is checked against the checkpoint's
model and names the tokenizer files to copy. See tools/ckpts/convert_to_hf.py --help for every flag.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from convert_to_hf import main  # noqa: E402  (tools/ckpts/convert_to_hf.py)

from megatron.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main, prog="convert_neox_to_hf")

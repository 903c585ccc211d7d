#!/usr/bin/env python
"""Import an HF GPT-NeoX/Pythia, Llama (incl. GQA), GPT-2 or Falcon model as our checkpoint.

    python tools/ckpts/convert_from_hf.py --input hf/pythia-160m --save checkpoints/hf_import \
        [--config-out configs/imported.yml] [--tp 2 --pp 2] [--seq-length 2048]
    python tools/ckpts/convert_from_hf.py --input SmolLM2-135M-Instruct.Q4_1.gguf --save checkpoints/smollm2

--input is an HF model directory or a .gguf file (llama.cpp's format; dequantized through transformers,
which needs `pip install gguf`). Writes SAVE/global_step0 (weights only), SAVE/tokenizer/ (with the chat
template of a chat model) and a YAML (default SAVE/model.yml) with the model and tokenizer keys;
fine-tune with it plus configs/finetune_example.yml.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.convert import import_hf  # noqa: E402
from megatron.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--input", required=True, help="HF model directory (config.json + weights) or a .gguf file")
    p.add_argument("--save", required=True, help="checkpoint root to write")
    p.add_argument("--config-out", help="YAML to write (default SAVE/model.yml)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    p.add_argument("--seq-length", type=int, help="training sequence length (default: the model's max positions)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="write into a non-empty save directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import_hf(args.input, args.save, args.config_out, args.tp, args.pp, args.seq_length,
              args.make_vocab_size_divisible_by, args.dtype, args.force, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="convert_from_hf")

#!/usr/bin/env python
"""Export our checkpoint (any TP/PP layout) as an HF model directory.

    python tools/ckpts/convert_to_hf.py --input checkpoints/finetune --output hf/sepllm-pythia \
        [--force] [--vocab-size 50277] [--dtype bf16]

--input is a save root (follows ``latest``) or a global_stepN directory. The architecture follows
the model config: GPTNeoXForCausalLM (layernorm + rotary), LlamaForCausalLM (rmsnorm + swiglu),
GPT2LMHeadModel (learned positions), FalconForCausalLM (layernorm + rotary + grouped-query attention,
or a model imported from Falcon); --architecture overrides the choice. SepLLM settings go into
config.json under "sepllm".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.convert import export_hf  # noqa: E402
from megatron.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--input", required=True, help="checkpoint root or global_stepN directory")
    p.add_argument("--output", required=True, help="HF model directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--vocab-size", type=int, help="real (unpadded) vocab size; default: from the tokenizer")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype (auto: as stored in the checkpoint)")
    p.add_argument("--architecture", choices=["gpt_neox", "llama", "gpt2", "falcon"],
                   help="HF class to write (default: from the model's shape and its import record)")
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from here (default: next to vocab_file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="export even if weights hold NaN/inf (refused by default: the run diverged)")
    g = p.add_argument_group("default Streaming-SepLLM cache of generate() (Sep-Attention models; "
                             "defaults as in tools/generate.py)")
    g.add_argument("--cache-policy", choices=["sepllm", "streamingllm", "full"],
                   help="default: streamingllm for a StreamingLLM-trained model, else sepllm")
    for flag, what in (("init-cache-size", "a: initial tokens kept"), ("sep-cache-size", "s: separators kept"),
                       ("local-size", "w: most recent tokens kept"), ("cache-size", "c: total budget per layer")):
        g.add_argument(f"--{flag}", type=int, help=what)
    g.add_argument("--no-pos-shift", action="store_true", help="rotate keys by stream position, not cache place")
    g.add_argument("--decode-mask", choices=["cache", "rule"], help="cache (default) or rule")
    args = p.parse_args(argv)
    cache = {key: value for key, value in (
        ("policy", args.cache_policy), ("init_cache_size", args.init_cache_size),
        ("sep_cache_size", args.sep_cache_size), ("local_size", args.local_size), ("cache_size", args.cache_size),
        ("enable_pos_shift", False if args.no_pos_shift else None), ("decode_mask", args.decode_mask))
        if value is not None}
    export_hf(args.input, args.output, args.force, args.vocab_size, args.dtype, args.tokenizer_dir,
              progress=not args.quiet, architecture=args.architecture, cache=cache,
              allow_non_finite=args.allow_non_finite)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="convert_to_hf")

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
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.convert import export_hf  # noqa: E402
from megatron.errors import ConversionError, UserError, run_cli  # noqa: E402

NEOX_ARCHITECTURES = {"neox": "gpt_neox"}  # NeoX's --architecture names that are ours under another name


def build_parser():
    p = cli_parser(__doc__)
    p.add_argument("--input", "--input_dir", dest="input", required=True,
                   help="checkpoint root or global_stepN directory")
    p.add_argument("--output", "--output_dir", dest="output", required=True, help="HF model directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--vocab-size", type=int, help="real (unpadded) vocab size; default: from the tokenizer")
    p.add_argument("--dtype", "--precision", dest="dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype (auto: as stored in the checkpoint)")
    p.add_argument("--architecture", choices=["gpt_neox", "llama", "gpt2", "falcon", "neox", "mistral"],
                   help="HF class to write (default: from the model's shape and its import record); neox = gpt_neox")
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from here (default: next to vocab_file)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="export even if weights hold NaN/inf (refused by default: the run diverged)")
    n = p.add_argument_group("GPT-NeoX's flags (tools/ckpts/convert_neox_to_hf.py)")
    n.add_argument("--config_file", "--config-file", dest="config_file",
                   help="the run's YAML: checked against the checkpoint's model; its vocab_file's folder gives "
                        "the tokenizer files")
    n.add_argument("--no_save_tokenizer", "--no-save-tokenizer", dest="no_save_tokenizer", action="store_true",
                   help="write no tokenizer files")
    n.add_argument("--vocab-is-hf-tokenizer", "--vocab_is_hf_tokenizer", dest="vocab_is_hf_tokenizer",
                   action="store_true", help="accepted: the tokenizer files are always written as HF's")
    n.add_argument("--pad-token-id", "--pad_token_id", dest="pad_token_id", type=int, default=-1,
                   help="-1 only (the tokenizer's own pad id is exported)")
    g = p.add_argument_group("default Streaming-SepLLM cache of generate() (Sep-Attention models; "
                             "defaults as in tools/generate.py)")
    g.add_argument("--cache-policy", choices=["sepllm", "streamingllm", "full"],
                   help="default: streamingllm for a StreamingLLM-trained model, else sepllm")
    for flag, what in (("init-cache-size", "a: initial tokens kept"), ("sep-cache-size", "s: separators kept"),
                       ("local-size", "w: most recent tokens kept"), ("cache-size", "c: total budget per layer")):
        g.add_argument(f"--{flag}", type=int, help=what)
    g.add_argument("--no-pos-shift", action="store_true", help="rotate keys by stream position, not cache place")
    g.add_argument("--decode-mask", choices=["cache", "rule"], help="cache (default) or rule")
    return p


def tokenizer_dir_from_config(config_file: str, checkpoint: str) -> Optional[str]:
    """NeoX's --config_file: its model keys must be the checkpoint's; its vocab_file's folder is returned."""
    from megatron.checkpointing import read_manifest, resolve_checkpoint_dir
    from megatron.config import config_from_tree, load_config

    cfg, _ = load_config([config_file], log=lambda *_: None)
    try:
        ours = config_from_tree(read_manifest(resolve_checkpoint_dir(checkpoint))["config"])
    except (UserError, KeyError, OSError) as err:
        raise ConversionError(f"cannot read checkpoint '{checkpoint}': {err}") from None
    differ = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "pos_emb", "norm",
                          "activation") if getattr(cfg.model, k) != getattr(ours.model, k)]
    if differ:
        k = differ[0]
        raise ConversionError(f"--config_file {config_file} does not describe checkpoint '{checkpoint}': "
                              f"{', '.join(differ)} differ ({k} {getattr(cfg.model, k)!r} vs "
                              f"{getattr(ours.model, k)!r} in the checkpoint)")
    return str(Path(cfg.data.vocab_file).parent) if cfg.data.vocab_file else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.architecture == "mistral":
        raise ConversionError("--architecture mistral is not implemented (export llama: the same weights for "
                              "a model without a sliding window)")
    if args.pad_token_id != -1:
        raise ConversionError("--pad-token-id is not implemented; the tokenizer's own pad id is exported")
    tokenizer_dir = args.tokenizer_dir
    if args.config_file and not tokenizer_dir:
        tokenizer_dir = tokenizer_dir_from_config(args.config_file, args.input)
    cache = {key: value for key, value in (
        ("policy", args.cache_policy), ("init_cache_size", args.init_cache_size),
        ("sep_cache_size", args.sep_cache_size), ("local_size", args.local_size), ("cache_size", args.cache_size),
        ("enable_pos_shift", False if args.no_pos_shift else None), ("decode_mask", args.decode_mask))
        if value is not None}
    export_hf(args.input, args.output, args.force, args.vocab_size, args.dtype, tokenizer_dir,
              progress=not args.quiet, architecture=NEOX_ARCHITECTURES.get(args.architecture, args.architecture),
              cache=cache, allow_non_finite=args.allow_non_finite, save_tokenizer=not args.no_save_tokenizer)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="convert_to_hf")

"""Command-line pieces shared by tools/generate.py and tools/eval_streaming_ppl.py."""
from __future__ import annotations

import argparse
from typing import Optional

from megatron.inference.kv_cache import DECODE_MASKS, POLICIES, CacheConfig


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint: a save root (follows 'latest') or global_stepN")
    parser.add_argument("--tokenizer-type", default=None, help="default: the checkpoint config's data.tokenizer_type")
    parser.add_argument("--vocab-file", default=None,
                        help="tokenizer file; default: the checkpoint config's, or tokenizer/ next to the checkpoint")
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--device", default="cpu")


def add_cache_args(parser: argparse.ArgumentParser, policy_default: str = "sepllm") -> None:
    g = parser.add_argument_group("KV cache (Streaming-SepLLM)")
    g.add_argument("--policy", default=policy_default, choices=POLICIES)
    g.add_argument("--init-cache-size", type=int, default=4, help="a: initial tokens kept")
    g.add_argument("--sep-cache-size", type=int, default=64, help="s: separators kept")
    g.add_argument("--local-size", type=int, default=256, help="w: most recent tokens kept at compression")
    g.add_argument("--cache-size", type=int, default=800, help="c: total budget (entries per layer)")
    g.add_argument("--no-pos-shift", action="store_true",
                   help="rotate keys by stream position instead of place in the cache")
    g.add_argument("--decode-mask", default="cache", choices=DECODE_MASKS,
                   help="cache: attend to every cached key; rule: apply the layer's Sep-Attention rule")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prefill at most this many tokens per forward")


def cache_config_from_args(args: argparse.Namespace, policy: Optional[str] = None) -> CacheConfig:
    return CacheConfig(policy or args.policy, args.init_cache_size, args.sep_cache_size, args.local_size,
                       args.cache_size, not args.no_pos_shift, args.decode_mask)

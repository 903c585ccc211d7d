#!/usr/bin/env python
"""Generate text from a checkpoint with the Streaming-SepLLM KV cache, streamed to stdout.

    python tools/generate.py --load CKPT --prompt "Once upon a time" --max-new-tokens 64 \\
        --temperature 0.8 --top-p 0.95 --policy sepllm --cache-size 800
    python tools/generate.py --load checkpoints/smollm2 --chat --prompt "What is gravity?"

Generation stops at the end-of-document token and at the model's own eos (tokenizer_config.json
'eos_token', e.g. '<|im_end|>' of a chat model). --chat sends the prompt as one user message through
the model's chat template (chat_template.jinja next to the tokenizer, as an HF import keeps it).

Bad input (unknown checkpoint, empty prompt, cache budget too small, ...) prints one line to
stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import InferenceError, run_cli  # noqa: E402
from megatron.inference.cli import add_cache_args, add_checkpoint_args, cache_config_from_args  # noqa: E402


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = cli_parser(__doc__)
    add_checkpoint_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    s = p.add_argument_group("sampling")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token or the eos")
    p.add_argument("--stats", action="store_true", help="print cache statistics to stderr at the end")
    add_cache_args(p)
    return p.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(args.prompt_file):
            raise InferenceError(f"prompt file '{args.prompt_file}' not found")
        text = Path(args.prompt_file).read_text()
    if not text:
        raise InferenceError("empty prompt: give some text with --prompt or --prompt-file")
    return text


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cache_cfg = cache_config_from_args(args)  # validate the budget before loading anything
    prompt = read_prompt(args)
    from megatron.inference.engine import StreamingEngine
    from megatron.inference.generation import TextStreamer, generate_tokens
    from megatron.inference.loading import load_model, load_tokenizer
    from megatron.inference.sampling import SamplingConfig
    from megatron.tokenizer.chat import render_chat, stop_ids

    tokenizer = load_tokenizer(args.load, args.tokenizer_type, args.vocab_file, args.merge_file)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = render_chat(tokenizer, messages)
    elif args.system:
        raise InferenceError("--system needs --chat")
    model, _, _ = load_model(args.load, tokenizer, args.device)
    sampling = SamplingConfig(args.greedy, args.temperature, args.top_k, args.top_p, args.seed,
                              vocab_limit=min(tokenizer.vocab_size, model.vocab_size))
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise InferenceError("the prompt encodes to no tokens")
    engine = StreamingEngine(model, cache_cfg)
    streamer = TextStreamer(tokenizer.decode)
    stops = () if args.no_stop else tuple(stop_ids(tokenizer))
    start, count = time.perf_counter(), 0
    for token in generate_tokens(engine, prompt_ids, args.max_new_tokens, sampling, stops, args.prefill_chunk):
        count += 1
        if token in stops:
            break
        sys.stdout.write(streamer.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"prompt {len(prompt_ids)} tokens, generated {count} in {elapsed:.2f}s; cache {engine.cache.length} "
              f"entries {engine.cache.region_sizes()}, {engine.cache.compressions} compressions",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)

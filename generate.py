#!/usr/bin/env python
"""Generate text as GPT-NeoX's generate.py does, driven by YAML (NeoX's configs/text_generation.yml keys):

    python deepy.py generate.py -d configs my_model.yml local_setup.yml text_generation.yml
    python generate.py my_model.yml text_generation.yml

``load:`` names the checkpoint (the model comes from it; a model key of the YAML that differs is
noted); the tokenizer is the config's
(``tokenizer_type`` / ``vocab_file``) or the checkpoint's. ``text_gen_type``: ``unconditional``
(``num_samples`` samples), ``input-file`` (one completion per prompt of ``sample_input_file``, prompts
separated by ``prompt_end``) or ``interactive`` (prompts from stdin); the first two write JSON lines to
``sample_output_file``. Sampling: ``maximum_tokens``, ``temperature``, ``top_k``, ``top_p`` (greedy when
all three are 0) and ``seed``. Generation runs through the bounded Streaming-SepLLM cache
(``cache_policy``, ``cache_size``, ... with tools/generate.py's defaults), or with ``recompute: true``
through the whole model at every token. The same prompt and settings give tools/generate.py's text.
"""
from __future__ import annotations

import os
import sys

from megatron.cli import cli_parser


def build_parser():
    p = cli_parser(__doc__)
    p.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.config import load_config
    from megatron.errors import InferenceError
    from megatron.inference.loading import load_model, load_tokenizer
    from megatron.inference.text_generation import Generator, plan, run_generation
    from megatron.tokenizer.chat import stop_ids

    if int(os.environ.get("RANK", "0")) != 0:  # one process generates (NeoX: model-parallel rank 0)
        return 0
    cfg, source = load_config(args.configs, log=lambda *_: None)
    if not cfg.checkpoint.load:
        raise InferenceError(f"no checkpoint: set 'load:' in {' / '.join(args.configs)} (the model comes from it)")
    planned = plan(cfg.generation)  # bad settings are reported before the model loads
    d = cfg.data
    vocab = d.vocab_file if d.vocab_file and os.path.isfile(d.vocab_file) else None
    tokenizer = load_tokenizer(cfg.checkpoint.load, d.tokenizer_type if vocab else None, vocab, d.merge_file)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, model_cfg, _ = load_model(cfg.checkpoint.load, tokenizer, device)
    for key in sorted(k for k in source if hasattr(cfg.model, k)):  # a NeoX model YAML next to the checkpoint
        if getattr(cfg.model, key) != getattr(model_cfg.model, key):
            print(f"note: {key} = {getattr(cfg.model, key)!r} in the config differs from the checkpoint's "
                  f"{getattr(model_cfg.model, key)!r}; the checkpoint's model is used", file=sys.stderr)
    generator = Generator(model, tokenizer, cfg.generation, cfg.training.seed, model_cfg.model.seq_length,
                          stop_ids(tokenizer))
    run_generation(generator, planned, log=lambda line: print(line, file=sys.stderr))
    return 0


if __name__ == "__main__":
    from megatron.errors import run_cli

    run_cli(main)

#!/usr/bin/env python
"""Evaluate a checkpoint on lm-evaluation-harness tasks, launched like train.py:

    python deepy.py eval.py configs/my.yml --tasks docs_lambada,docs_cloze
    python eval.py configs/my.yml --tasks lambada_openai,arc_easy --num-fewshot 0 --limit 200
    python eval.py --load checkpoints/tiny --tasks docs --output-path results/tiny.json

The YAML files (merged left to right, as for training) name the checkpoint (``load:``) and the
tokenizer; an ``attention:`` section overrides the checkpoint's attention rule (``sepllm: {mode: full}``).
Command-line flags override the YAML. Local tasks (docs_lambada, docs_cloze, docs_ppl,
docs_lambada_greedy; ``docs`` = all) read data/eval/ (tools/datasets/build_eval_tasks.py writes it);
every other name is an lm-eval task whose data comes from the HF hub. Results: a JSON file and a
markdown table (printed too), optionally wandb. Several ranks (``deepy.py --num-procs N``) split the
requests (data parallel; every rank holds the whole model).
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron.cli import cli_parser


def build_parser():
    p = cli_parser(__doc__)
    p.add_argument("configs", nargs="*", help="YAML config files, merged left to right (optional with --load)")
    p.add_argument("--tasks", "--eval_tasks", "--eval-tasks", dest="tasks", nargs="+", required=True,
                   help="task names, comma- or space-separated; 'docs' = all local tasks")
    p.add_argument("--load", default=None, help="checkpoint (save root or global_stepN); overrides 'load:'")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 8)")
    p.add_argument("--output-path", default=None,
                   help="results FILE.json (markdown next to it) or a folder (default eval_results/)")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights and activations (default fp32)")
    p.add_argument("--task-data", default=None, help="folder of the local tasks' data (default data/eval)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence in one forward (default: the model's seq_length)")
    p.add_argument("--long-context", choices=("stream", "truncate"), default=None,
                   help="longer requests: through the streaming KV cache (default) or cut from the left (as HF)")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--vocab-file", default=None, help="tokenizer file; overrides the config's")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bootstrap-iters", type=int, default=None, help="for standard errors (default 10000; 0 = off)")
    p.add_argument("--log-samples", action="store_true", default=None, help="keep per-example outputs in the JSON")
    p.add_argument("--use-wandb", action="store_true", default=None, help="also log the metrics to wandb")
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbosity", default="WARNING", help="lm-eval's log level (default WARNING)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    """eval.py's exit code; bad input (config, checkpoint, task) is one ``error:`` line and 2."""
    from megatron.errors import exit_code

    return exit_code(evaluate, argv)


def evaluate(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron.evaluation import runner
    from megatron.parallel.distributed import init_distributed, rank, shutdown_distributed

    log = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *_: None)
    runner.quiet_lm_eval(args.verbosity)
    settings = runner.settings_from_config(
        args.configs, log=log, load=args.load, tasks=args.tasks, num_fewshot=args.num_fewshot,
        limit=args.limit, batch_size=args.batch_size, output_path=args.output_path, device=args.device,
        dtype=args.dtype, task_data=args.task_data, max_length=args.max_length, long_context=args.long_context,
        tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        seed=args.seed, bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
        use_wandb=args.use_wandb, wandb_project=args.wandb_project, progress=False if args.no_progress else None)
    init_distributed()
    results = runner.evaluate(settings, log=log)
    if rank() == 0 and results is not None:
        json_path, md_path = runner.write_outputs(settings, results)
        print(runner.results_table(results))
        print(f"wrote {json_path} and {md_path}")
        if settings.use_wandb:
            runner.log_wandb(settings, results, json_path.parent)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

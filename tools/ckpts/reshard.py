#!/usr/bin/env python
"""Re-shard a checkpoint for another layout: ``tools/ckpts/reshard.py --load DIR --save DIR --tp N --pp M``.

``--load`` is a save root (follows ``latest``) or a ``global_stepN`` directory; the result is written
as ``SAVE/global_stepN`` plus ``SAVE/latest`` and can be resumed with ``load: SAVE`` at the new
model_parallel_size / pipe_parallel_size. AdamW state is re-sharded too unless ``--weights-only``.
``--save`` must be a new or empty directory, not the one holding ``--load``, unless ``--force``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import cli_parser  # noqa: E402


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--load", required=True, help="source checkpoint (save root or global_stepN dir)")
    p.add_argument("--save", required=True, help="output save root")
    p.add_argument("--tp", type=int, required=True, help="target model_parallel_size")
    p.add_argument("--pp", type=int, default=1, help="target pipe_parallel_size")
    p.add_argument("--weights-only", action="store_true", help="drop the optimizer state")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --save, even the one holding --load (replaces that step)")
    args = p.parse_args(argv)

    from megatron.checkpointing.reshard import check_output_dir, save_resharded
    from megatron.errors import CheckpointError

    if args.tp < 1 or args.pp < 1:
        raise CheckpointError("--tp and --pp must be >= 1")
    check_output_dir(args.load, args.save, args.force)
    out = save_resharded(args.load, args.save, args.tp, args.pp, weights_only=args.weights_only,
                         progress=not args.quiet)
    print(f"wrote {out} (tp={args.tp}, pp={args.pp})")
    return 0


if __name__ == "__main__":
    from megatron.errors import run_cli

    run_cli(main)

#!/usr/bin/env python
"""Train a model: ``python train.py configs/a.yml [configs/b.yml ...]`` (usually via deepy.py)."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    args = parser.parse_args(argv)

    from megatron.config import dump_config, load_config
    from megatron.errors import UserError, report

    rank = int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *_: None)
    printed = bool(os.environ.get("SEPLLM_CONFIG_PRINTED"))  # deepy.py already printed the merge messages
    try:
        cfg, _ = load_config(args.configs, log=(lambda *_: None) if printed else log)
        if rank == 0 and not os.environ.get("SEPLLM_CONFIG_PRINTED"):
            print("resolved config:\n" + dump_config(cfg), flush=True)
        from megatron.parallel.distributed import shutdown_distributed
        from megatron.training.trainer import Trainer

        Trainer(cfg).train()
        shutdown_distributed()
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

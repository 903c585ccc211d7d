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

    from megatron.checkpointing import CheckpointError
    from megatron.config import ConfigError, dump_config, load_config
    from megatron.data import DataError

    rank = int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *_: None)
    try:
        cfg, _ = load_config(args.configs, log=log)
        if rank == 0 and not os.environ.get("SEPLLM_CONFIG_PRINTED"):
            print("resolved config:\n" + dump_config(cfg), flush=True)
        from megatron.training.trainer import Trainer

        from megatron.training.distributed import shutdown_distributed

        Trainer(cfg).train()
        shutdown_distributed()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

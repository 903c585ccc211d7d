#!/usr/bin/env python
"""Launch training: ``python deepy.py [--num-procs N | --hostfile H] train.py configs/a.yml configs/b.yml``.

Configs are merged left to right, validated and printed before anything starts. One node runs
torchrun (gloo on CPU, nccl on GPU); a hostfile (``host slots=N`` per line) gives per-node
torchrun commands started over ssh, or one ``deepspeed`` launcher command with ``--launcher
deepspeed``. ``--node-rank K`` runs only node K's command here (for schedulers that start one
launcher per node). The config's ``hostfile``, ``launcher``, ``num_gpus``, ``master_addr`` and
``master_port`` (NeoX's launcher keys) apply unless the flags say otherwise. ``--dry-run`` checks
the data and tokenizer paths, prints the parameter count, the attention rule of every layer, the
batch and token arithmetic and the commands, and starts nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-procs", "--num_gpus", "--num-gpus", dest="num_procs", type=int, default=None,
                   help="processes on this node (default: GPUs present, else tp x pp)")
    p.add_argument("--hostfile", "-H", default=None, help="DeepSpeed-format hostfile: 'host slots=N' lines")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None)
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                   help="default: the config's master_port, else 29500")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                   help="with --hostfile: run only this node's command, locally")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default=None,
                   help="multi-node launcher (default: the config's launcher, else torchrun)")
    p.add_argument("--conf-dir", "-d", dest="conf_dir", default=None, help="directory prefixed to config names")
    p.add_argument("--dry-run", action="store_true",
                   help="check paths, print the model, attention and batch summary and the commands, and exit")
    p.add_argument("script", help="training script, e.g. train.py")
    p.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.config import dump_config, load_config, validate_launch
    from megatron.errors import LaunchError, UserError, report
    from megatron.launch.launcher import build_commands, world_size

    configs = [str(Path(args.conf_dir) / c) if args.conf_dir else c for c in args.configs]
    try:
        if not Path(args.script).is_file():
            raise LaunchError(f"training script not found: {args.script}")
        cfg, _ = load_config(configs)
        launch = cfg.launch
        hostfile = args.hostfile or launch.hostfile
        num_procs = args.num_procs or launch.num_gpus or (None if hostfile else launch.global_num_gpus)
        if num_procs is None:
            import torch

            num_procs = torch.cuda.device_count() or (cfg.parallel.model_parallel_size *
                                                      cfg.parallel.pipe_parallel_size)
        world = world_size(num_procs, hostfile)
        if launch.global_num_gpus and world != launch.global_num_gpus:
            raise LaunchError(f"global_num_gpus {launch.global_num_gpus} != the {world} processes this launch "
                              "starts (hostfile slots or num_gpus)")
        dp = validate_launch(cfg, world)  # fail here, not in every rank
        commands = build_commands(args.script, configs, num_procs, hostfile, args.master_addr or launch.master_addr,
                                  args.master_port or launch.master_port or 29500,
                                  args.launcher or launch.launcher)
        if args.dry_run:
            from megatron.training.summary import run_report

            summary = run_report(cfg, dp)
    except UserError as e:
        return report(e)
    print("resolved config:\n" + dump_config(cfg), flush=True)
    if args.dry_run:
        print("\n".join(summary))
        for c in commands:
            print(f"# node {c.node_rank} ({c.host})\n{c.shell()}")
        return 0
    env = dict(os.environ, SEPLLM_CONFIG_PRINTED="1")
    if args.node_rank is not None:
        if not hostfile or not 0 <= args.node_rank < len(commands):
            print(f"error: --node-rank {args.node_rank} needs --hostfile with more than {args.node_rank} hosts",
                  file=sys.stderr)
            return 2
        return subprocess.call(commands[args.node_rank].argv, env=env)
    procs = [subprocess.Popen(c.argv if not c.remote else c.shell(), shell=c.remote, env=env) for c in commands]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())

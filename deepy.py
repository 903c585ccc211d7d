#!/usr/bin/env python
"""Launch training: ``python deepy.py [--num-procs N | --hostfile H] train.py configs/a.yml configs/b.yml``.

Configs are merged left to right, validated and printed before anything starts. One node runs
torchrun (gloo on CPU, nccl on GPU); a hostfile (``host slots=N`` per line) gives per-node
torchrun commands started over ssh, or one ``deepspeed`` launcher command with ``--launcher
deepspeed``. ``--node-rank K`` runs only node K's command here (for schedulers that start one
launcher per node). The config's ``hostfile``, ``launcher``, ``num_gpus``, ``master_addr`` and
``master_port`` (NeoX's launcher keys) apply unless the flags say otherwise. ``--launcher slurm`` (or
``launcher: slurm``) inside a SLURM allocation runs one srun task per rank (megatron/launch/slurm.py).
``--dry-run`` prints the commands and starts nothing; for ``train.py`` it first checks the data and
tokenizer paths and prints the parameter count, the attention rule of every layer and the batch and
token arithmetic.

Script arguments: the YAML files follow the script; options deepy does not know (``--tasks x``), with
their values, and everything after a bare ``--``, are passed on to the script in order, as in NeoX's
``deepy.py eval.py my.yml --eval_tasks ...``. deepy's own options may come before or after the script.

Exit code: the ranks' (0 done or stopped by a signal after saving, 2 bad config / data / checkpoint, 3
diverged, 128 + N a rank killed by signal N, 1 a crash), with the error printed once for all ranks
(megatron/launch/outcome.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # no prefix matching: a script's --dev must not become ours
    p.add_argument("--num-procs", "--num_gpus", "--num-gpus", dest="num_procs", type=int, default=None,
                   help="processes on this node (default: GPUs present, else tp x pp x cp: one model replica)")
    p.add_argument("--hostfile", "-H", default=None, help="DeepSpeed-format hostfile: 'host slots=N' lines")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None)
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                   help="default: the config's master_port, else 29500")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                   help="with --hostfile: run only this node's command, locally")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), default=None,
                   help="multi-node launcher (default: the config's launcher, else torchrun); slurm: srun "
                        "inside an allocation, one task per rank")
    p.add_argument("--conf-dir", "-d", dest="conf_dir", default=None, help="directory prefixed to config names")
    p.add_argument("--dry-run", action="store_true",
                   help="check paths, print the model, attention and batch summary and the commands, and exit")
    p.add_argument("script", help="training script, e.g. train.py")
    p.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, verbatim = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, unknown = p.parse_known_args(own)
    args.script_args = unknown + verbatim  # passed to the script after the configs
    return args


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

            par = cfg.parallel  # one model replica: tp x pp x cp (the config sets no data-parallel size)
            num_procs = torch.cuda.device_count() or (par.model_parallel_size * par.pipe_parallel_size
                                                      * par.context_parallel_size)
        world = world_size(num_procs, hostfile)
        launcher = args.launcher or launch.launcher
        if launcher == "slurm":  # srun inside the allocation, one task per rank (megatron/launch/slurm.py)
            from megatron.launch.slurm import SrunLaunch

            srun = SrunLaunch.in_allocation(launch, args, num_procs, os.environ)
            world = srun.world
        if launch.global_num_gpus and world != launch.global_num_gpus:
            raise LaunchError(f"global_num_gpus {launch.global_num_gpus} != the {world} processes this launch "
                              "starts (hostfile slots or num_gpus)")
        dp = validate_launch(cfg, world)  # fail here, not in every rank
        commands = srun.commands(args.script, configs + args.script_args) if launcher == "slurm" else \
            build_commands(args.script, configs + args.script_args, num_procs, hostfile,
                           args.master_addr or launch.master_addr, args.master_port or launch.master_port or 29500,
                           launcher)
        summary = []
        if args.dry_run and Path(args.script).name == "train.py":  # other scripts need no training data
            from megatron.training.summary import run_report

            summary = run_report(cfg, dp)
        if args.dry_run:  # the ranks refuse it on their device; this machine may be a login node
            from megatron.config.validation import zero_fp16_device_problem

            problem = zero_fp16_device_problem(cfg)
            if problem:
                summary.append(f"warning: ranks on a machine like this one will refuse this config: {problem}")
    except UserError as e:
        return report(e)
    print("resolved config:\n" + dump_config(cfg), flush=True)
    if args.dry_run:
        for line in summary:
            print(line)
        for c in commands:
            print(f"# node {c.node_rank} ({c.host})\n{c.shell()}")
        return 0
    env = dict(os.environ, SEPLLM_CONFIG_PRINTED="1")
    if launcher == "slurm":
        return srun.run(commands[0], env)
    if args.node_rank is not None:
        if not hostfile or not 0 <= args.node_rank < len(commands):
            print(f"error: --node-rank {args.node_rank} needs --hostfile with more than {args.node_rank} hosts",
                  file=sys.stderr)
            return 2
        commands = [dataclasses.replace(commands[args.node_rank], remote=False)]  # this node's share, here
    # Stop signals are forwarded to the ranks (they save and exit 0); the children get SIGTERM if this
    # launcher dies, even by SIGKILL: no orphan ranks (megatron/launch/signals.py).
    from megatron.launch.outcome import command_exit_code
    from megatron.launch.signals import start_local, wait_all

    procs = [start_local(c.shell() if c.remote else c.argv, env, shell=c.remote) for c in commands]
    code = wait_all(procs, [["ssh", c.host] if c.remote else c.argv for c in commands])
    # The ranks' exit code (megatron/launch/outcome.py); a command killed by signal N: 128 + N.
    return command_exit_code(code, args.script if world == 1 else "a node's torchrun")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the ranks started (after, it is forwarded to them)
        print("deepy.py: interrupted", file=sys.stderr)
        sys.exit(130)

#!/usr/bin/env python
"""Launch training: ``python deepy.py [--num-procs N | --hostfile H] train.py configs/a.yml configs/b.yml``.

Configs are merged left to right, validated and printed before anything starts. One node runs
torchrun (gloo on CPU, nccl on GPU); a hostfile (``host slots=N`` per line) gives per-node
torchrun commands started over ssh, or one ``deepspeed`` launcher command with ``--launcher
deepspeed``; ``--include`` / ``--exclude`` / ``--num-nodes`` pick hosts and slots as DeepSpeed's runner
does. ``--node-rank K`` runs only node K's command here (for schedulers that start one
launcher per node). The config's ``hostfile``, ``launcher``, ``num_gpus``, ``master_addr``,
``master_port``, ``include``, ``exclude`` and ``num_nodes`` (NeoX's launcher keys) apply unless the
flags say otherwise. ``--launcher slurm`` (or
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

import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUR_SCRIPTS = ("train.py", "eval.py", "generate.py")  # repo-root scripts, found from any directory as in NeoX


def build_parser():
    from megatron.cli import cli_parser

    p = cli_parser(__doc__, prog="deepy.py")
    p.add_argument("--num-procs", "--num_gpus", "--num-gpus", dest="num_procs", type=int, default=None,
                   help="processes on this node (default: GPUs present, else tp x pp x cp: one model replica)")
    p.add_argument("--hostfile", "-H", default=None, help="DeepSpeed-format hostfile: 'host slots=N' lines")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None)
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                   help="default: the config's master_port, else 29500")
    p.add_argument("--include", default=None, help="DeepSpeed's host selection: 'node-a@node-b:0,2'")
    p.add_argument("--exclude", default=None, help="hosts (or host:slots) to leave out, as --include")
    p.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int, default=None,
                   help="use the first N hosts of the hostfile (default: the config's num_nodes, -1: all)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                   help="with --hostfile: run only this node's command, locally")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), default=None,
                   help="multi-node launcher (default: the config's launcher, else torchrun); slurm: srun "
                        "inside an allocation, one task per rank")
    p.add_argument("--conf-dir", "--conf_dir", "-d", dest="conf_dir", default=None,
                   help="directory prefixed to config names")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="check paths, print the model, attention and batch summary and the commands, and exit")
    p.add_argument("script", help="script to launch: train.py, eval.py, generate.py (found next to deepy.py "
                                  "when not in the current directory) or a path")
    p.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    return p


def resolve_script(script: str) -> str:
    """The script as given when it exists, else one of ours next to deepy.py (NeoX's repo-root scripts)."""
    if not Path(script).is_file() and script in OUR_SCRIPTS and (ROOT / script).is_file():
        return str(ROOT / script)
    return script


def script_parser(script: str):
    """The argument parser of one of our scripts (train.py, eval.py, generate.py), else None."""
    path = Path(script).resolve()
    if path.parent != ROOT or path.name not in OUR_SCRIPTS:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_deepy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top-level imports only: the scripts import torch lazily
    return module.build_parser()


def check_flags(parser, own, args) -> None:
    """deepy's unknown flags are errors before anything starts: before the script they are deepy's;
    after it, a flag one of our scripts does not know, or (for another script) one spelled like a
    flag of deepy's (``--dryrun``), is refused; other flags go to the script."""
    from megatron.cli import closest_flag, long_flags, unknown_flag_message

    ours = parser.known_flags()
    script_at = own.index(args.script) if args.script in own else len(own)
    target = script_parser(args.script)
    theirs = target.known_flags() if target is not None else []
    spelled = {flag.replace("_", "-") for flag in ours + theirs}
    for i, flag in long_flags(own):
        if flag in ours or flag in theirs or flag.replace("_", "-") in spelled:
            continue
        if i < script_at or target is not None or closest_flag(flag, ours, cutoff=0.8):
            parser.fail(unknown_flag_message(flag, ours + theirs))


def parse_args(argv):
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    own, verbatim = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, unknown = p.parse_known_args(own)
    args.script = resolve_script(args.script)
    own = [resolve_script(a) if a in OUR_SCRIPTS else a for a in own]
    check_flags(p, own, args)
    args.script_args = unknown + verbatim  # passed to the script after the configs
    return args


def main(argv=None) -> int:
    """deepy's exit code; bad input (config, hostfile, flags) is one ``error:`` line and 2."""
    from megatron.errors import exit_code

    return exit_code(launch_script, argv)


def launch_script(argv=None) -> int:
    args = parse_args(argv)
    from megatron.config import dump_config, load_config, validate_launch
    from megatron.errors import LaunchError
    from megatron.launch.launcher import build_commands, usable_hostfile, world_size

    configs = [str(Path(args.conf_dir) / c) if args.conf_dir else c for c in args.configs]
    if not Path(args.script).is_file():
        raise LaunchError(f"script not found: {args.script} (deepy.py runs train.py, eval.py, generate.py or a "
                          "script path)")
    cfg, _ = load_config(configs)
    launch = cfg.launch
    hostfile = usable_hostfile(args.hostfile or launch.hostfile)
    num_procs = args.num_procs or launch.num_gpus or (None if hostfile else launch.global_num_gpus)
    if num_procs is None:
        import torch

        par = cfg.parallel  # one model replica: tp x pp x cp (the config sets no data-parallel size)
        num_procs = torch.cuda.device_count() or (par.model_parallel_size * par.pipe_parallel_size
                                                  * par.context_parallel_size)
    hosts = dict(include=args.include or launch.include, exclude=args.exclude or launch.exclude,
                 num_nodes=launch.num_nodes if args.num_nodes is None else args.num_nodes)
    world = world_size(num_procs, hostfile, **hosts)
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
                       launcher, **hosts)
    summary = []
    if args.dry_run and Path(args.script).name == "train.py":  # other scripts need no training data
        from megatron.training.summary import run_report

        summary = run_report(cfg, dp)
    if args.dry_run:  # the ranks refuse it on their device; this machine may be a login node
        from megatron.config.validation import zero_fp16_device_problem

        problem = zero_fp16_device_problem(cfg)
        if problem:
            summary.append(f"warning: ranks on a machine like this one will refuse this config: {problem}")
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
            raise LaunchError(f"--node-rank {args.node_rank} needs --hostfile with more than {args.node_rank} hosts")
        commands = [dataclasses.replace(commands[args.node_rank], remote=False)]  # this node's share, here
    # Stop signals are forwarded to the ranks (they save and exit 0); the children get SIGTERM if this
    # launcher dies, even by SIGKILL: no orphan ranks (megatron/launch/signals.py).
    from megatron.launch.outcome import command_exit_code
    from megatron.launch.signals import start_local, wait_all

    procs = [start_local(c.shell() if c.remote else c.argv, {**env, **c.env}, shell=c.remote) for c in commands]
    code = wait_all(procs, [["ssh", c.host] if c.remote else c.argv for c in commands])
    # The ranks' exit code (megatron/launch/outcome.py); a command killed by signal N: 128 + N.
    return command_exit_code(code, args.script if world == 1 else "a node's torchrun")


if __name__ == "__main__":  # Ctrl-C before the ranks start: exit 130 (after, it is forwarded to them)
    sys.exit(main())

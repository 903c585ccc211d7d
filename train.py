#!/usr/bin/env python
"""Train a model: ``python train.py configs/a.yml [configs/b.yml ...]`` (usually via deepy.py).

Under SLURM, a task of an srun step takes its rank from SLURM's environment (``deepspeed_slurm`` or
``launcher: slurm``), and a stop by SIGUSR1 (or SIGTERM during a preemption) requeues the job after the
checkpoint (megatron/launch/slurm.py).

Exit codes: 0 finished, or stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint; 2 bad config,
data or checkpoint (one ``error:`` line); 3 training diverged (non-finite steps, see
max_skipped_steps); 128 + N: signal N arrived before training started.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    args = parser.parse_args(argv)
    # Before the heavy imports: stop signals (preemption, Ctrl-C) and the launcher's death are handled.
    from megatron.launch.signals import die_with_parent, launched_by_launcher
    from megatron.launch.slurm import in_srun_step, provisional_rank
    from megatron.training import exit_signals

    if launched_by_launcher() and not in_srun_step():  # srun's tasks live and die with their step
        die_with_parent()
    exit_signals.install()  # stays installed until exit: no traceback from a late signal either
    try:
        return run(args.configs, provisional_rank())
    finally:  # exiting: a late stop (SLURM's, after a requeue) must not interrupt the interpreter's clean-up
        exit_signals.ignore_from_now()


def run(configs, rank: int) -> int:
    from megatron.training.exit_signals import Interrupted

    trained = False
    try:
        from megatron.config import dump_config, load_config
        from megatron.errors import UserError, report
        from megatron.training.guards import TrainingDiverged

        log = print if rank == 0 else (lambda *_: None)
        printed = bool(os.environ.get("SEPLLM_CONFIG_PRINTED"))  # deepy.py already printed the merge messages
        try:
            cfg, _ = load_config(configs, log=(lambda *_: None) if printed else log)
            if rank == 0 and not printed:
                print("resolved config:\n" + dump_config(cfg), flush=True)
            from megatron.launch.slurm import ranks_from_slurm, requeue_after_stop, resume_requeued_run
            from megatron.parallel.distributed import shutdown_distributed
            from megatron.training.trainer import Trainer

            ranks_from_slurm(cfg.launch)
            resume_requeued_run(cfg.checkpoint, log=log)
            trainer = Trainer(cfg)
            trainer.train()
            trained = True
            shutdown_distributed()
            if rank == 0 and trainer.stop_signal:
                requeue_after_stop(trainer.stop_signal, cfg.checkpoint.save)
        except UserError as e:
            return report(e)
        except TrainingDiverged as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            return 3
    except Interrupted as e:  # outside the training loop (inside it, a signal saves and stops cleanly)
        if rank == 0:
            print(f"{e} {'after training had finished' if trained else 'before training started; nothing saved'}",
                  file=sys.stderr)
        return 0 if trained else 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

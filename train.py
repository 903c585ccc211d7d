#!/usr/bin/env python
"""Train a model: ``python train.py configs/a.yml [configs/b.yml ...]`` (usually via deepy.py).

Under SLURM, a task of an srun step takes its rank from SLURM's environment (``deepspeed_slurm`` or
``launcher: slurm``), and a stop by SIGUSR1 (or SIGTERM during a preemption) requeues the job after the
checkpoint (megatron/launch/slurm.py).

Exit codes: 0 finished, or stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint; 2 bad config,
data or checkpoint (one ``error:`` line); 3 training diverged (non-finite steps, see
max_skipped_steps); 128 + N: signal N arrived before training started. deepy.py returns the same
codes for any number of ranks (megatron/launch/outcome.py).
"""
from __future__ import annotations

import os
import sys

from megatron.cli import cli_parser


def build_parser():
    parser = cli_parser(__doc__)
    parser.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    return parser


def main(argv=None, exiting: bool = False) -> int:
    """Train; the exit code. ``exiting``: this process ends with that code (``python train.py``): a stop
    signal from then on ends it at once with the code. Otherwise (called from Python) the process's
    signal handlers are restored on return."""
    args = build_parser().parse_args(argv)
    # Before the heavy imports: stop signals (preemption, Ctrl-C) and the launcher's death are handled.
    from megatron.launch.signals import die_with_parent, launched_by_launcher
    from megatron.launch.slurm import in_srun_step, provisional_rank
    from megatron.training import exit_signals

    if launched_by_launcher() and not in_srun_step():  # srun's tasks live and die with their step
        die_with_parent()
    exit_signals.install()
    code = 1
    try:
        code = run(args.configs, provisional_rank())
        return code
    finally:
        if exiting:  # a late stop (a launcher ending the other ranks, SLURM's after a requeue) ends the
            exit_signals.exit_quietly_on_signal(code)  # process with its code, no traceback from clean-up
        else:
            exit_signals.uninstall()


def run(configs, rank: int) -> int:
    # A failure is told once: under deepy.py the launcher prints each rank's message once
    # (megatron/launch/outcome.py); alone, this process prints it.
    from megatron.launch.outcome import INTERRUPTED, report_crash, report_failure
    from megatron.training.exit_signals import Interrupted

    trained = False
    try:
        from megatron.config import dump_config, load_config
        from megatron.errors import EXIT_DIVERGED, EXIT_USER_ERROR, UserError
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
            if cfg.training.eval_tasks:
                from megatron.evaluation.during_training import TaskEvaluator

                trainer.task_evaluator = TaskEvaluator(trainer, trainer.log)
            trainer.train()
            trained = True
            shutdown_distributed()
            if rank == 0 and trainer.stop_signal:
                requeue_after_stop(trainer.stop_signal, cfg.checkpoint.save)
        except UserError as e:
            return report_failure(EXIT_USER_ERROR, f"error: {e}")
        except TrainingDiverged as e:
            return report_failure(EXIT_DIVERGED, f"error: {e}", every_rank=False)
    except Interrupted as e:  # outside the training loop (inside it, a signal saves and stops cleanly)
        if trained:
            if rank == 0:
                print(f"{e} after training had finished", file=sys.stderr)
            return 0
        return report_failure(128 + e.signum, f"{e} before training started; nothing saved", every_rank=False,
                              kind=INTERRUPTED)
    except Exception:
        import traceback

        if report_crash(traceback.format_exc()):  # the launcher shows it once, not once per rank
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(exiting=True))

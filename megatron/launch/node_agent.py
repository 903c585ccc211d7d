"""The per-node launcher deepy.py starts: torchrun, run in this process, ending in one outcome.

``python -m megatron.launch.node_agent <torchrun arguments>`` runs ``torch.distributed.run`` as
``torchrun`` would, with a folder for the ranks' outcomes (``megatron.launch.outcome``). When a rank
fails, torchrun stops the others and raises ``ChildFailedError`` with a traceback of its own and
logs a line per stopped rank; here that becomes the summary instead: the error line once, or the
crashed rank's traceback once, and the exit code of the cause (2 user error, 3 divergence, 128 + N a
rank killed by signal N, 1 a crash).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from megatron.launch.outcome import STATUS_DIR_ENV, read_statuses, signal_name, summarize

# torchrun's own account of a failure, replaced by the summary: "Sending process N closing signal
# SIGTERM" per stopped rank and "failed (exitcode: N) local_rank: ..." (other records still show).
QUIET_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")


class _DropFailureRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name not in QUIET_LOGGERS or record.levelno >= logging.CRITICAL


def _quiet_failure_logs() -> None:
    for name in ("torch.distributed", "torch", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_DropFailureRecords())


def main(argv: Optional[List[str]] = None) -> int:
    status_dir = Path(tempfile.mkdtemp(prefix="sepllm-ranks-"))
    os.environ[STATUS_DIR_ENV] = str(status_dir)  # the ranks inherit it
    # torchrun's own default for several ranks per node, without its four-line banner about it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        _quiet_failure_logs()
        exit_codes: Dict[int, int] = {}
        try:
            run(parse_args(argv))
        except ChildFailedError as e:
            exit_codes = {int(rank): failure.exitcode for rank, failure in e.failures.items()}
        except SignalException as e:  # this agent itself was signalled (its launcher died): ranks stopped
            print(f"torchrun: stopped by {signal_name(int(e.sigval))}; the ranks were stopped", file=sys.stderr,
                  flush=True)
            return 128 + int(e.sigval)
        code, lines = summarize(exit_codes, read_statuses(status_dir))
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

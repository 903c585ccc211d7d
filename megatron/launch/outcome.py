"""How a run of several ranks ends: one message and one exit code, whatever the number of ranks.

Exit codes (train.py, and deepy.py whatever the rank count): 0 finished, or stopped by a signal after
saving; 2 bad config, data or checkpoint; 3 diverged; 128 + N a rank was killed by signal N (or
signal N arrived before training started); 1 a crash (a bug: its traceback is shown once).

Rank side (:func:`report_failure`, :func:`report_crash`, in megatron/errors.py): under our per-node launcher
(``megatron.launch.node_agent``, which sets ``SEPLLM_RANK_STATUS_DIR``) a rank does not print its
failure; it writes ``rank<N>.json`` (exit code, kind, message or traceback, time) for the launcher.
Run by hand or by another launcher, it prints as before (the error line on stderr).

Launcher side (:func:`summarize`): when one rank fails, torchrun stops the others, which then fail
too (a SIGTERM before training, a collective whose peer is gone). The summary names the cause, not
its consequences, in this order of precedence:

  1. user errors and divergence (codes 2 and 3): each distinct message once;
  2. a rank killed by a signal other than the SIGTERM torchrun sends to stop the rest (SIGKILL from
     the out-of-memory killer, SIGSEGV, ...): one line naming the rank and the signal; 128 + N;
  3. a crash: the earliest rank's traceback, once; exit 1;
  4. a stop signal before training started: its message once; 128 + N;
  5. anything else (a script that prints its own errors, not train.py): its exit code, nothing added.
"""
from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

# The rank side lives with the error types (megatron/errors.py), which every CLI reports through.
from megatron.errors import (  # noqa: F401
    CRASH,
    ERROR,
    EXIT_CRASH,
    EXIT_DIVERGED,
    EXIT_USER_ERROR,
    INTERRUPTED,
    STATUS_DIR_ENV,
    report_crash,
    report_failure,
)


# ----------------------------------------------------------------------------- launcher side
@dataclass
class RankStatus:
    rank: int
    code: int
    kind: str
    text: str
    time: float


def read_statuses(folder: Path) -> Dict[int, RankStatus]:
    out: Dict[int, RankStatus] = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            raw = json.loads(path.read_text())
            out[int(raw["rank"])] = RankStatus(int(raw["rank"]), int(raw["code"]), str(raw["kind"]),
                                               str(raw["text"]), float(raw["time"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a rank killed at that moment: as if it had written nothing
    return out


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _killed_line(rank: int, signum: int) -> str:
    why = ", as the out-of-memory killer does" if signum == signal.SIGKILL else ""
    return (f"error: rank {rank} was killed by {signal_name(signum)} (signal {signum}{why}); the other ranks "
            "were stopped. Resume from the last checkpoint ('latest')")


def summarize(exit_codes: Dict[int, int], statuses: Dict[int, RankStatus]) -> Tuple[int, List[str]]:
    """(exit code, lines to print) for ranks that ended with ``exit_codes`` (global rank -> code as
    the agent saw it, negative for a signal; ranks that exited 0 may be left out) and the outcomes
    they recorded. The order of precedence is in the module docstring."""
    by_time = sorted(statuses.values(), key=lambda s: (s.time, s.rank))
    errors = [s for s in by_time if s.kind == ERROR and s.code in (EXIT_USER_ERROR, EXIT_DIVERGED)]
    if errors:
        return errors[0].code, list(dict.fromkeys(s.text for s in errors))
    killed = sorted((r, -c) for r, c in exit_codes.items() if c < 0 and -c != signal.SIGTERM and r not in statuses)
    if killed:
        rank, signum = killed[0]
        return 128 + signum, [_killed_line(rank, signum)]
    crashes = [s for s in by_time if s.kind == CRASH]
    if crashes:
        first = crashes[0]
        return EXIT_CRASH, [f"rank {first.rank} failed:\n{first.text.rstrip()}"]
    interrupted = [s for s in by_time if s.kind == INTERRUPTED]
    if interrupted:
        return interrupted[0].code, list(dict.fromkeys(s.text for s in interrupted))
    recorded = [s for s in by_time if s.code]
    if recorded:
        return recorded[0].code, list(dict.fromkeys(s.text for s in recorded))
    failed = sorted((r, c) for r, c in exit_codes.items() if c)
    if not failed:
        return 0, []
    rank, code = failed[0]
    if code < 0:
        return 128 - code, [_killed_line(rank, -code)]
    return code, []  # a script that reports its own errors (or a second stop signal): it said why itself


def command_exit_code(returncode: int, what: str) -> int:
    """A launched command's return code as this launcher's exit code: a command killed by signal N
    (negative ``returncode``) is 128 + N, with one line saying so."""
    if returncode >= 0:
        return returncode
    signum = -returncode
    print(f"error: {what} was killed by {signal_name(signum)} (signal {signum})", file=sys.stderr, flush=True)
    return 128 + signum

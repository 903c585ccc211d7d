"""The one user-facing error type, and the CLI wrapper that prints it as one line.

A :class:`UserError` is a problem the user can fix (a config key, a file, a checkpoint, a launch
setting); its message names the file or key and what was expected. Every command-line entry point
runs through :func:`run_cli`, which prints ``error: <message>`` to stderr and exits 2, never a
traceback (:func:`exit_code` is the same without the exit, for a ``main`` that tests call in-process and
that returns its code). The subclasses only say which input was wrong; nothing catches them separately.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, NoReturn, Optional


class UserError(Exception):
    """A problem with the user's input; the message is one line naming what and where."""


class ConfigError(UserError):
    """A YAML config problem: unknown key, wrong type or value, inconsistent layout."""


class DataError(UserError):
    """A data problem: missing or corrupt dataset or tokenizer files, bad preprocessing input."""


class CheckpointError(UserError):
    """A checkpoint problem: unwritable directory, missing, incompatible or corrupt checkpoint."""


class ConversionError(UserError):
    """A Hugging Face import/export problem."""


class InferenceError(UserError):
    """Bad inference input: cache budget, prompt, checkpoint, tokenizer or sampling settings."""


class LaunchError(UserError):
    """A launcher problem: hostfile, script path, node rank."""


EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training stopped: non-finite steps (megatron.training.guards)
EXIT_INTERRUPTED = 130
EXIT_CRASH = 1


# A rank's outcome, for the launcher that prints it once for all ranks (megatron/launch/outcome.py)
STATUS_DIR_ENV = "SEPLLM_RANK_STATUS_DIR"
ERROR, INTERRUPTED, CRASH = "error", "interrupted", "crash"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _record(code: int, kind: str, text: str) -> bool:
    """Write this rank's outcome for the launcher; False when no launcher collects outcomes."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return False
    path = Path(folder) / f"rank{_rank()}.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"rank": _rank(), "code": code, "kind": kind, "text": text, "time": time.time()}))
        os.replace(tmp, path)
    except OSError:
        return False  # the launcher's folder is gone: tell it the old way
    return True


def report_failure(code: int, message: str, every_rank: bool = True, kind: str = ERROR) -> int:
    """A deliberate stop (user error, divergence, early signal) with its one-line message; returns
    ``code``. Without a launcher collecting outcomes the message goes to stderr, from every rank (an
    error may be one rank's own) or, with ``every_rank=False`` (all ranks fail alike), rank 0 only."""
    if not _record(code, kind, message) and (every_rank or _rank() == 0):
        print(message, file=sys.stderr, flush=True)
    return code


def report_crash(traceback_text: str) -> bool:
    """A crash: recorded for the launcher (True), or False: the caller lets it propagate as usual."""
    return _record(EXIT_CRASH, CRASH, traceback_text)




def report(err: UserError, prog: Optional[str] = None) -> int:
    """Print ``err`` as one line (``[prog: ]error: message``); returns the exit code for user errors.
    A rank under deepy's launcher records it instead, and the launcher prints it once for all ranks."""
    return report_failure(EXIT_USER_ERROR, f"{prog + ': ' if prog else ''}error: {err}")


Main = Callable[[Optional[List[str]]], Optional[int]]


def exit_code(main: Main, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run a CLI entry point and return its exit code: a user error is one line on stderr and 2;
    Ctrl-C is one line and 130."""
    try:
        return main(argv) or 0
    except UserError as err:
        return report(err, prog)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def run_cli(main: Main, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> NoReturn:
    """Run a CLI entry point and exit with :func:`exit_code`'s code."""
    sys.exit(exit_code(main, argv, prog))

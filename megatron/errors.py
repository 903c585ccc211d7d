"""The one user-facing error type, and the CLI wrapper that prints it as one line.

A :class:`UserError` is a problem the user can fix (a config key, a file, a checkpoint, a launch
setting); its message names the file or key and what was expected. Every command-line entry point
runs through :func:`run_cli`, which prints ``error: <message>`` to stderr and exits 2, never a
traceback (:func:`exit_code` is the same without the exit, for a ``main`` that tests call in-process and
that returns its code). The subclasses only say which input was wrong; nothing catches them separately.
"""
from __future__ import annotations

import sys
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


def report(err: UserError, prog: Optional[str] = None) -> int:
    """Print ``err`` as one line (``[prog: ]error: message``); returns the exit code for user errors."""
    print(f"{prog + ': ' if prog else ''}error: {err}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


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

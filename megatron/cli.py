"""The one argument-parser factory every command-line entry point uses (train.py, eval.py, generate.py,
deepy.py, tools/*.py).

No prefix matching (``--sav`` is not ``--save``: a flag means what it spells); ``_`` and ``-`` are
interchangeable inside a flag, as in config keys (NeoX writes ``--input_dir``); a flag the command
does not know is one line naming it, with the closest known flag when there is one, exit 2::

    error: unknown flag --dryrun; did you mean --dry-run?

It is checked before argparse looks for required flags, so a misspelled required flag is reported as
misspelled, not as missing.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

EXIT_USAGE = 2


def _norm(flag: str) -> str:
    return flag.lstrip("-").replace("_", "-").lower()


def closest_flag(flag: str, known: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The known ``--flag`` closest to ``flag`` (``_``/``-`` and case ignored), or None."""
    by_norm = {}
    for k in known:
        if k.startswith("--"):
            by_norm.setdefault(_norm(k), k)
    match = difflib.get_close_matches(_norm(flag), list(by_norm), n=1, cutoff=cutoff)
    return by_norm[match[0]] if match else None


# GPT-NeoX's (and Megatron's) spellings of flags that our tools spell otherwise: the hint names ours.
NEOX_FLAGS = {
    "input-dir": ("--input", "--load"), "output-dir": ("--output", "--save"), "precision": ("--dtype",),
    "maximum-tokens": ("--max-new-tokens",), "jsonl-keys": ("--json-key",), "eval-tasks": ("--tasks",),
    "num-gpus": ("--num-procs",), "vocab": ("--vocab-file",), "recompute": ("--policy",),
    "sample-input-file": ("--prompt-file",), "model-parallel-size": ("--tp",), "pipe-parallel-size": ("--pp",),
    "target-tp": ("--tp",), "target-pp": ("--pp",),
}


def unknown_flag_message(flag: str, known: Iterable[str]) -> str:
    known = list(known)
    same = next((k for k in known if k.startswith("--") and _norm(k) == _norm(flag)), None)
    ours = next((k for k in NEOX_FLAGS.get(_norm(flag), ()) if k in known), None)
    if ours and not same:
        return f"unknown flag {flag} (GPT-NeoX's spelling); did you mean {ours}?"
    hint = same or closest_flag(flag, known)
    return f"unknown flag {flag}" + (f"; did you mean {hint}?" if hint else "")


def long_flags(argv: Sequence[str]) -> List[Tuple[int, str]]:
    """(index, flag) of every ``--flag`` / ``--flag=value`` token before a bare ``--``."""
    found = []
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            found.append((i, token.split("=", 1)[0]))
    return found


class CliParser(argparse.ArgumentParser):
    """argparse without abbreviations, whose unknown flags are one line with a suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def known_flags(self) -> List[str]:
        return [s for action in self._actions for s in action.option_strings]

    def unknown_flags(self, argv: Sequence[str]) -> List[str]:
        known = set(self.known_flags())
        return [flag for _, flag in long_flags(argv) if flag not in known]

    def spelled_as_known(self, argv: Sequence[str]) -> List[str]:
        """``argv`` with each flag that is a known one with ``_`` for ``-`` (or the reverse: NeoX spells
        ``--input_dir``, we ``--input-dir``) written as the known one; other tokens unchanged."""
        known = self.known_flags()
        by_norm = {}
        for k in known:
            if k.startswith("--"):
                by_norm.setdefault(_norm(k), k)
        argv = list(argv)
        for i, flag in long_flags(argv):
            if flag not in known and _norm(flag) in by_norm and flag.lower() == flag:
                argv[i] = by_norm[_norm(flag)] + argv[i][len(flag):]
        return argv

    def parse_known_args(self, args=None, namespace=None):
        argv = self.spelled_as_known(sys.argv[1:] if args is None else args)
        return super().parse_known_args(argv, namespace)

    def parse_args(self, args=None, namespace=None):
        argv = self.spelled_as_known(sys.argv[1:] if args is None else args)
        unknown = self.unknown_flags(argv)
        if unknown:
            self.fail(unknown_flag_message(unknown[0], self.known_flags()))
        return super().parse_args(argv, namespace)

    def fail(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)

    def error(self, message: str):  # argparse's own errors: one line, not the usage block
        self.fail(message + f" (see {self.prog} --help)")


def cli_parser(description: Optional[str] = None, prog: Optional[str] = None, **kwargs) -> CliParser:
    """The parser for a command-line entry point (see the module docstring)."""
    return CliParser(prog=prog, description=description, **kwargs)

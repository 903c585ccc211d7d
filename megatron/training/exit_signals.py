"""Graceful stop on SIGTERM / SIGINT / SIGUSR1 (preemption, Ctrl-C), after Megatron's exit-signal handler.

While training (inside :func:`deferred_exit_signals`), a signal only sets a flag. After every step
the Trainer calls :func:`agreed_exit_signal`, which all-reduces the flag (MAX over all ranks), so
every rank stops after the same step even when only one rank was signalled; the Trainer then saves a
checkpoint and the run exits 0 with one line saying why. A second signal stops the process at once
(exit 128 + signal, nothing saved; the next run cleans the temporary files up) -- except in a SLURM
job, where one stop reaches a task more than once (from slurmstepd, from srun, from deepy.py) and the
scheduler escalates by itself (SIGKILL after KillWait or the preemption's grace time).

Outside training (setup: data, model, resume), a signal raises :class:`Interrupted` right away: there
is nothing to save yet, and ``train.py`` prints one line and exits non-zero.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Dict, Iterator

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal arrived outside the training loop (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum


_state: Dict[str, object] = {"received": 0, "deferred": False, "previous": None}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received_signal() -> int:
    """The first stop signal this process received (0: none)."""
    return int(_state["received"])


def _handler(signum, frame) -> None:
    if _state["received"] and _state["deferred"] and "SLURM_JOB_ID" in os.environ:
        return  # the same stop again; see the module doc
    if _state["received"] and _state["deferred"]:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"second {signal_name(signum)}: stopping now without saving", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _state["received"] = signum
    if not _state["deferred"]:
        raise Interrupted(signum)


def install() -> bool:
    """Install the handlers (main thread only); False when they already were or cannot be."""
    if _state["previous"] is not None:
        return False
    try:
        _state["previous"] = {s: signal.signal(s, _handler) for s in EXIT_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        return False
    return True


def exit_quietly_on_signal(code: int) -> None:
    """The process is on its way out with ``code``: a stop signal now (a launcher stopping the other
    ranks after one failed) ends it at once with that code, instead of raising inside exit handlers."""
    def finish(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    try:
        for s in EXIT_SIGNALS:
            signal.signal(s, finish)
    except ValueError:  # not the main thread
        pass


def uninstall() -> None:
    previous = _state["previous"]
    if previous is None:
        return
    for s, h in previous.items():
        signal.signal(s, h)
    _state["previous"] = None


@contextlib.contextmanager
def deferred_exit_signals() -> Iterator[None]:
    """Within: stop signals only set the flag, read by :func:`agreed_exit_signal` after each step."""
    installed_here = install()
    was_deferred = _state["deferred"]
    _state["deferred"] = True
    try:
        yield
    finally:
        _state["deferred"] = was_deferred
        _state["received"] = 0
        if installed_here:
            uninstall()


def agreed_exit_signal(device) -> int:
    """The stop signal any rank received (0: none); the same value on every rank (one all-reduce)."""
    import torch  # not at import time: train.py installs the handlers before loading torch
    import torch.distributed as dist

    flag = received_signal()
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(flag, dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t)
    return flag

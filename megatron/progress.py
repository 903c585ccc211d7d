"""Progress of long work (preprocessing, conversion, resharding, evaluation) on stderr: done / total,
percent, rate and ETA.

On a terminal one line is rewritten in place (at most 5 times a second); elsewhere (a log file, a
scheduler's output) a plain line is written at most every ``interval`` seconds (default 10), and once
at the end. Without a total (a compressed input of unknown size) it shows what is done and the rate.

    progress = Progress("tokenizing", total=os.path.getsize(path), unit="B")
    progress.update(len(chunk))
    progress.close()
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def human(value: float, unit: str) -> str:
    """``1.5 MB`` for bytes (unit ``B``), ``1,234`` for counts (with the unit after it when given)."""
    if unit == "B":
        for prefix in ("", "k", "M", "G", "T"):
            if value < 1000 or prefix == "T":
                return f"{value:.0f} {prefix}B" if not prefix else f"{value:.1f} {prefix}B"
            value /= 1000
    return f"{value:,.0f}" + (f" {unit}" if unit else "")


def clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts work done towards ``total`` and reports it (module docstring). ``enabled=False`` reports
    nothing; ``every`` adds a line at least every that many units (NeoX's --log-interval)."""

    def __init__(self, desc: str, total: Optional[float] = None, unit: str = "", enabled: bool = True,
                 stream: Optional[TextIO] = None, interval: float = 10.0, every: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.every, self.clock = every, clock
        self.done = 0.0
        self.start = self.last = clock()
        self.last_done = 0.0
        self.closed = False

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {human(self.done, self.unit)}"]
        if self.total:
            parts[0] += f" / {human(self.total, self.unit)} ({100 * min(self.done / self.total, 1):.0f}%)"
        parts.append(f"{human(rate, self.unit)}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {clock_text((self.total - self.done) / rate)}")
        parts.append(f"elapsed {clock_text(elapsed)}")
        return ", ".join(parts)

    def _write(self, final: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last, self.last_done = self.clock(), self.done

    def update(self, n: float = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        due = self.clock() - self.last >= self.interval
        if due or (self.every and self.done - self.last_done >= self.every):
            self._write()

    def set(self, done: float) -> None:
        """Report ``done`` units finished so far (an absolute count)."""
        self.update(done - self.done)

    def close(self) -> None:
        """The final line (done = total when everything was counted); only once."""
        if self.enabled and not self.closed:
            self._write(final=True)
        self.closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.enabled and self.tty and not self.closed:  # leave the terminal on a fresh line
            self.stream.write("\n")
            self.closed = True

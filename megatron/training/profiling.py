"""NeoX's ``profile`` and ``memory_profiling``, and the memory figure of every training log line.

``profile: true`` records iterations ``profile_step_start + 1 .. profile_step_stop`` with torch.profiler
(iteration ``profile_step_start`` is its warm-up) and writes one Chrome-trace file per rank,
``rank{R}.<time>.pt.trace.json``, into ``tensorboard_dir`` (where NeoX writes them and TensorBoard's
profiler plugin looks), else ``log_dir``; https://ui.perfetto.dev opens them too. On CUDA the profiled
iterations are also NVTX ranges (``iteration N`` with ``forward-backward``, ``gradient reduction``,
``optimizer step`` inside) between ``cudaProfilerStart/Stop``, for ``nsys profile
--capture-range=cudaProfilerApi``.

``memory_profiling: true`` records CUDA allocations from the start and writes
``memory_profiling_path/mem_snapshot.pickle`` (``mem_snapshot_rank{R}.pickle`` on other ranks; open it
at https://pytorch.org/memory_viz) after the profiled iterations; without CUDA it writes the process's
peak RSS there (``peak_rss.json``) and logs it.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

_nvtx_on = False  # NVTX ranges only while a CUDA run is being profiled


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range around the block while a CUDA run is being profiled; nothing otherwise."""
    if not _nvtx_on:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def rss_bytes() -> int:
    """Resident set size now (Linux /proc); the peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def memory_figures(device: Optional[torch.device]) -> Dict[str, float]:
    """The memory figure of a training log line: peak allocated on a GPU, RSS (and its peak) on CPU."""
    if device is not None and device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"rss_gib": rss_bytes() / 2**30, "peak_rss_gib": peak_rss_bytes() / 2**30}


def memory_text(stats: Dict[str, float]) -> str:
    if "peak_memory_gib" in stats:
        return f"peak memory {stats['peak_memory_gib']:.2f} GiB"
    return f"RSS {stats['rss_gib']:.2f} GiB (peak {stats['peak_rss_gib']:.2f})"


class RunProfiler:
    """Starts and stops torch.profiler, NVTX and the memory recording around the configured iterations.
    The trainer calls ``before_step(n)`` / ``after_step(n)`` with the number of the iteration it runs."""

    def __init__(self, logging_cfg, device: torch.device, rank: int, log: Callable[[str], None],
                 start_iteration: int = 0):
        lg = logging_cfg
        self.enabled, self.memory = lg.profile, lg.memory_profiling
        self.start, self.stop = lg.profile_step_start, lg.profile_step_stop
        self.trace_dir = lg.tensorboard_dir or lg.log_dir
        self.memory_dir = lg.memory_profiling_path
        self.cuda = device.type == "cuda"
        self.rank, self.log = rank, log
        self.prof = None
        if self.memory and self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if (self.enabled or self.memory) and start_iteration >= self.stop:
            log(f"profile: this run starts after iteration {start_iteration}, past profile_step_stop {self.stop}; "
                "nothing will be profiled")

    def _first(self) -> int:
        """The first iteration the profiler sees: the warm-up one (none when start is 0)."""
        return max(self.start, 1)

    def before_step(self, n: int) -> None:
        global _nvtx_on
        if self.enabled and n == self._first():
            warmup = 1 if self.start >= 1 else 0
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            Path(self.trace_dir).mkdir(parents=True, exist_ok=True)
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=self.stop - self.start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}"),
                record_shapes=True, profile_memory=True, with_flops=True)
            self.prof.start()
            if self.cuda:
                torch.cuda.cudart().cudaProfilerStart()
                _nvtx_on = True
        if _nvtx_on:
            torch.cuda.nvtx.range_push(f"iteration {n}")

    def after_step(self, n: int) -> None:
        global _nvtx_on
        if _nvtx_on:
            torch.cuda.nvtx.range_pop()
        if self.prof is not None:
            self.prof.step()
            if n >= self.stop:
                self._finish()
        if self.memory and n == self.stop:
            self._memory_report(n)

    def _finish(self) -> None:
        global _nvtx_on
        self.prof.stop()
        self.prof = None
        if self.cuda:
            torch.cuda.cudart().cudaProfilerStop()
            _nvtx_on = False
        self.log(f"profile: traces of iterations {self.start + 1}..{self.stop} written to {self.trace_dir} "
                 "(TensorBoard's profiler plugin or https://ui.perfetto.dev)")

    def _memory_report(self, n: int) -> None:
        out = Path(self.memory_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cuda:
            from pickle import dump

            path = out / ("mem_snapshot.pickle" if self.rank == 0 else f"mem_snapshot_rank{self.rank}.pickle")
            with open(path, "wb") as f:
                dump(torch.cuda.memory._snapshot(), f)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.log(f"memory_profiling: CUDA memory snapshot after iteration {n} written to {path} "
                     "(https://pytorch.org/memory_viz)")
            return
        path = out / ("peak_rss.json" if self.rank == 0 else f"peak_rss_rank{self.rank}.json")
        peak = peak_rss_bytes()
        path.write_text(json.dumps({"iteration": n, "rank": self.rank, "peak_rss_bytes": peak}) + "\n")
        self.log(f"memory_profiling: no CUDA here; peak RSS {peak / 2**20:.0f} MiB after iteration {n}, "
                 f"written to {path}")

    def close(self) -> None:
        """A run that ends inside the profiled iterations still writes what was recorded."""
        if self.prof is not None:
            self._finish()

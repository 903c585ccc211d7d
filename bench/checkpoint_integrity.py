#!/usr/bin/env python
"""Cost of checkpoint checksums: save (and load) of a ~200 MB checkpoint with xxh3_64, with crc32, and
with hashing switched off, in one run (interleaved repeats; wall time min and median, CPU time).

    python bench/checkpoint_integrity.py [--mb 200] [--repeats 5] [--dir /tmp]

Saves go through ``save_checkpoint`` (files fsynced either way); "off" replaces the hasher with one
that does nothing, so the difference is the hashing alone. Loads go through ``load_checkpoint``;
"off" skips verification.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.checkpointing import checkpoint as checkpoint_module  # noqa: E402
from megatron.checkpointing import integrity, load_checkpoint, load_optimizer_state, save_checkpoint  # noqa: E402
from megatron.parallel import ParallelLayout  # noqa: E402
from megatron.training.optimizer import load_named_optimizer_state, named_optimizer_state  # noqa: E402


class NoHash:
    name = "none"

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0"


def build(total_mb: int):
    """A model whose weights + AdamW moments come to about ``total_mb`` MB."""
    n_params = total_mb * 2**20 // (3 * 4)
    width = 2048
    layers = max(1, n_params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def timed_save(root: Path, model, opt, hasher_factory) -> tuple:
    real = integrity.new_hasher
    integrity.new_hasher = hasher_factory
    try:
        shutil.rmtree(root, ignore_errors=True)
        start, cpu = time.perf_counter(), time.process_time()
        save_checkpoint(str(root), 1, model, named_optimizer_state(opt, model), {"consumed_samples": 0}, {})
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        integrity.new_hasher = real


def timed_load(root: Path, model, opt, verify: bool) -> tuple:
    real = checkpoint_module.load_shard
    if not verify:
        checkpoint_module.load_shard = lambda path, weights_only=True, manifest=None: torch.load(
            path, map_location="cpu", weights_only=weights_only)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        load_checkpoint(str(root), model)
        load_named_optimizer_state(opt, model, load_optimizer_state(str(root), ParallelLayout()))
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        checkpoint_module.load_shard = real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, opt = build(args.mb)
    variants = {"xxh3_64": lambda algorithm=None: integrity._Xxh3(),
                "crc32": lambda algorithm=None: integrity._Crc32(),
                "off": lambda algorithm=None: NoHash()}
    saves = {k: [] for k in variants}
    loads = {"verified": [], "off": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "ckpt"
        for _ in range(args.repeats):
            for name, factory in variants.items():
                saves[name].append(timed_save(root, model, opt, factory))
            timed_save(root, model, opt, variants["xxh3_64"])
            for name in loads:
                loads[name].append(timed_load(root, model, opt, verify=(name == "verified")))
        size = sum(f.stat().st_size for f in (root / "global_step1").iterdir()) / 2**20
    print(f"checkpoint {size:.0f} MB on {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores), {time.strftime('%Y-%m-%d')}, {args.repeats} interleaved "
          "repeats; overhead vs. hashing off, from the fastest (min) and the median repeat")
    report("save", saves, "off")
    report("load", loads, "off")
    return 0


def report(what: str, times: dict, base_name: str) -> None:
    """Wall-clock overhead (min and median repeat) and the extra CPU time (all threads, median) as a
    share of the base's fastest wall time: the overhead on a machine with no core to spare."""
    walls = {k: [w for w, _ in v] for k, v in times.items()}
    cpus = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    base_min, base_med = min(walls[base_name]), statistics.median(walls[base_name])
    for name, ws in walls.items():
        t_min, t_med = min(ws), statistics.median(ws)
        print(f"{what} {name:8s} wall min {t_min:6.3f} s ({100 * (t_min - base_min) / base_min:+5.1f}%)  "
              f"median {t_med:6.3f} s ({100 * (t_med - base_med) / base_med:+5.1f}%)  extra CPU "
              f"{100 * (cpus[name] - cpus[base_name]) / base_min:+5.1f}% of the base's wall time")


if __name__ == "__main__":
    sys.exit(main())

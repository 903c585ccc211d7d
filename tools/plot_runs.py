#!/usr/bin/env python
"""Plot training curves of several runs in one PNG: loss vs step and loss vs wall time.

    python tools/plot_runs.py runs/full runs/sepllm runs/streamingllm --out bench/out/loss.png

Each run directory holds the ``metrics.jsonl`` the trainer writes to ``log_dir``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402


class PlotError(UserError):
    pass


def read_run(run_dir: str) -> Dict[str, List[float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (expected the trainer's log_dir)")
    run = {"step": [], "time": [], "loss": [], "valid_step": [], "valid_loss": []}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{lineno}: not a JSON line") from None
        if "train/loss" in rec:
            run["step"].append(rec["iteration"])
            run["time"].append(rec["time"])
            run["loss"].append(rec["train/loss"])
        if "valid/loss" in rec:
            run["valid_step"].append(rec["iteration"])
            run["valid_loss"].append(rec["valid/loss"])
    if not run["step"]:
        raise PlotError(f"{path}: no training loss records")
    t0 = run["time"][0]
    run["time"] = [t - t0 for t in run["time"]]
    return run


def plot(runs: Dict[str, Dict[str, List[float]]], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        line, = by_step.plot(run["step"], run["loss"], label=name, linewidth=1.2)
        if run["valid_step"]:
            by_step.plot(run["valid_step"], run["valid_loss"], "o--", color=line.get_color(), markersize=3)
        by_time.plot(run["time"], run["loss"], label=name, linewidth=1.2)
    by_step.set_xlabel("iteration")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_step, by_time):
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    by_step.set_title("loss vs step (dashed: validation)")
    by_time.set_title("loss vs wall time")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("runs", nargs="+", help="run directories (log_dir), optionally NAME=DIR")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        runs[name] = read_run(path)
    plot(runs, args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)

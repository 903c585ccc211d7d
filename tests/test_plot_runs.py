import json
import subprocess
import sys

from conftest import ROOT


def test_plot_runs_writes_png(tmp_path):
    for name, offset in (("a", 0.0), ("b", 0.5)):
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for it in range(1, 11):
                f.write(json.dumps({"iteration": it, "time": 100 + it, "train/loss": 5 - 0.1 * it + offset}) + "\n")
            f.write(json.dumps({"iteration": 10, "time": 111, "valid/loss": 4.2 + offset}) + "\n")
    out = tmp_path / "plot.png"
    res = subprocess.run([sys.executable, "tools/plot_runs.py", f"full={tmp_path / 'a'}", str(tmp_path / "b"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_runs_missing_log_is_clear(tmp_path):
    res = subprocess.run([sys.executable, "tools/plot_runs.py", str(tmp_path), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "no metrics.jsonl" in res.stderr and "Traceback" not in res.stderr

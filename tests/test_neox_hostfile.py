"""NeoX's flagship config names a hostfile that does not exist (``hostfile: /mock_path``): as with NeoX and
DeepSpeed, one warning line and the run stays on this node."""
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli
from test_neox_train import DIALECT, losses, overlay

from megatron.launch.launcher import usable_hostfile

NEOX_125M = str(DIALECT / "neox_125M_style.yml")


def test_missing_hostfile_is_one_warning_and_this_node(tmp_path):
    said = []
    assert usable_hostfile("/mock_path", said.append) is None
    assert said == ["warning: hostfile /mock_path not found; running on this node only (as DeepSpeed does)"]
    real = tmp_path / "hosts"
    real.write_text("node-a slots=2\n")
    assert usable_hostfile(str(real), said.append) == str(real) and len(said) == 1


def test_neox_125M_with_a_local_overlay_dry_runs_on_this_node(tiny_dataset, tmp_path):
    """python deepy.py --dry-run train.py 125M.yml local_overlay.yml, NeoX's command line."""
    local = overlay(tmp_path, tiny_dataset, "run")
    dry = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", NEOX_125M, local],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    warnings = [ln for ln in (dry.stdout + dry.stderr).splitlines() if "/mock_path" in ln and "warning" in ln]
    assert warnings == ["warning: hostfile /mock_path not found; running on this node only (as DeepSpeed does)"]
    assert "# node 0 (localhost)" in dry.stdout and "ssh" not in dry.stdout.split("# node 0")[1]


@pytest.mark.slow
def test_neox_125M_with_a_local_overlay_trains(tiny_dataset, tmp_path):
    """The same command without --dry-run: ZeRO-1 on this node (DeepSpeed's start-up is the slow part)."""
    out = run_cli(["deepy.py", "train.py", NEOX_125M, overlay(tmp_path, tiny_dataset, "run")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iter      4/4" in out.stdout and len(losses(tmp_path / "run" / "log")) == 4

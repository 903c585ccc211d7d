import subprocess
import sys

import pytest

from megatron.errors import LaunchError
from megatron.launch.launcher import build_commands, parse_hostfile


def test_hostfile_parse_and_errors(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("# cluster\nnode-a slots=4\nnode-b slots=4  # second\n\n")
    assert [(x.name, x.slots) for x in parse_hostfile(str(h))] == [("node-a", 4), ("node-b", 4)]
    h.write_text("node-a slots=four\n")
    with pytest.raises(LaunchError, match=r"hosts:1: slots must be an integer"):
        parse_hostfile(str(h))
    h.write_text("node-a gpus=4\n")
    with pytest.raises(LaunchError, match=r"hosts:1: expected 'HOST slots=N'"):
        parse_hostfile(str(h))
    with pytest.raises(LaunchError, match="hostfile not found"):
        parse_hostfile(str(tmp_path / "missing"))


def test_multi_node_commands(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("node-a slots=2\nnode-b slots=2\n")
    cmds = build_commands("train.py", ["c.yml"], 2, str(h), None, 29501)
    assert [c.node_rank for c in cmds] == [0, 1]
    for i, c in enumerate(cmds):
        assert "--nnodes=2" in c.argv and f"--node_rank={i}" in c.argv
        assert "--master_addr=node-a" in c.argv and "--master_port=29501" in c.argv
        assert c.remote and c.shell().startswith(f"ssh {c.host} ")
    ds = build_commands("train.py", ["c.yml"], 2, str(h), None, 29501, launcher="deepspeed")
    assert len(ds) == 1 and ds[0].argv[0] == "deepspeed" and f"--hostfile={h}" in ds[0].argv


def test_deepy_dry_run_two_hosts(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=1\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "--hostfile", str(h), "train.py",
                          "configs/tiny.yml"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "# node 0 (10.0.0.1)" in out.stdout and "# node 1 (10.0.0.2)" in out.stdout
    assert "--node_rank=1" in out.stdout and "--master_addr=10.0.0.1" in out.stdout
    assert "resolved config:" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["train.py", "configs/nope.yml"], "error: config file not found: configs/nope.yml"),
    (["missing_script.py", "configs/tiny.yml"], "error: training script not found"),
])
def test_deepy_bad_input_one_line(args, message):
    out = subprocess.run([sys.executable, "deepy.py", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(message) and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

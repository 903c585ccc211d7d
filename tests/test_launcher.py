import os
import subprocess
import sys

import pytest

from megatron.errors import LaunchError
from megatron.launch.launcher import build_commands, parse_hostfile, select_hosts, world_size


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


def test_deepy_dry_run_two_hosts(tmp_path, tiny_dataset):
    h = tmp_path / "hosts"
    h.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=1\n")
    data = tmp_path / "data.yml"  # dry-run checks that the data exists (configs/tiny.yml's is made by make demo)
    data.write_text(f"data_path: {tiny_dataset}\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "--hostfile", str(h), "train.py",
                          "configs/tiny.yml", str(data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "# node 0 (10.0.0.1)" in out.stdout and "# node 1 (10.0.0.2)" in out.stdout
    assert "--node_rank=1" in out.stdout and "--master_addr=10.0.0.1" in out.stdout
    assert "resolved config:" in out.stdout
    # the run in words: parameters, the rule of every layer, separators with their tokens, batch arithmetic
    assert "attention, layers 0-3: SepLLM: 3 initial + separators + local window 32" in out.stdout
    assert "separators (" in out.stdout and "'.'" in out.stdout and "parameters: " in out.stdout
    assert "batch: micro 8 x accumulation 1 x data-parallel 2 = 16 sequences x 256 tokens" in out.stdout


def test_deepy_takes_launch_keys_from_the_config_and_dry_run_checks_paths(tmp_path, tiny_dataset):
    h = tmp_path / "hosts"
    h.write_text("10.0.0.7 slots=2\n10.0.0.8 slots=2\n")
    cfg = tmp_path / "launch.yml"
    cfg.write_text(f'data_path: {tiny_dataset}\nhostfile: {h}\nlauncher: pdsh\nmaster_port: 29611\n'
                   'global_num_gpus: 4\n')
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", "configs/tiny.yml", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # NeoX's launcher: pdsh is the DeepSpeed launcher, which runs pdsh itself
    assert out.stdout.count("# node") == 1 and f"deepspeed --hostfile={h}" in out.stdout
    assert "--master_port=29611" in out.stdout and "--master_addr=10.0.0.7" in out.stdout
    cfg.write_text(f"data_path: {tmp_path / 'nowhere'}\nvocab_file: {tmp_path / 'tok.json'}\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", "configs/tiny.yml", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "error: 3 missing paths:" and len(lines) == 4
    assert "nowhere.bin' not found" in lines[1] and "nowhere.idx' not found" in lines[2]
    assert "vocab_file" in lines[3] and "tok.json' not found" in lines[3]


@pytest.mark.parametrize("args, message", [
    (["train.py", "configs/nope.yml"], "error: config file not found: configs/nope.yml"),
    (["missing_script.py", "configs/tiny.yml"], "error: script not found"),
])
def test_deepy_bad_input_one_line(args, message):
    out = subprocess.run([sys.executable, "deepy.py", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(message) and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_include_exclude_num_nodes_pick_hosts_and_slots(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("node-a slots=4\nnode-b slots=4\nnode-c slots=4\n")
    picked = lambda **kw: [(x.name, x.slots, x.devices) for x in select_hosts(parse_hostfile(str(h)), **kw)]  # noqa: E731
    assert picked(include="node-a@node-c") == [("node-a", 4, None), ("node-c", 4, None)]
    assert picked(include="node-b:1,3@node-c:0,2") == [("node-b", 2, [1, 3]), ("node-c", 2, [0, 2])]
    assert picked(exclude="node-b") == [("node-a", 4, None), ("node-c", 4, None)]
    assert picked(exclude="node-a:0,1") == [("node-a", 2, [2, 3]), ("node-b", 4, None), ("node-c", 4, None)]
    assert picked(num_nodes=2) == [("node-a", 4, None), ("node-b", 4, None)]
    assert picked(exclude="node-a", num_nodes=1) == [("node-b", 4, None)]
    for kw, message in [(dict(include="node-z"), "include: host 'node-z' is not in the hostfile"),
                        (dict(include="node-a:4"), r"node-a has slots 0-3, not \[4\]"),
                        (dict(include="node-a:x"), "slots after ':' must be integers"),
                        (dict(include="node-a", exclude="node-b"), "exclusive"),
                        (dict(num_nodes=4), "num_nodes 4: only 3 hosts"),
                        (dict(exclude="node-a@node-b@node-c"), "leaves no host")]:
        with pytest.raises(LaunchError, match=message):
            picked(**kw)
    cmds = build_commands("train.py", ["c.yml"], 4, str(h), None, 29501, include="node-b:1,3@node-c:0,2")
    assert [(c.host, c.env) for c in cmds] == [("node-b", {"CUDA_VISIBLE_DEVICES": "1,3"}),
                                               ("node-c", {"CUDA_VISIBLE_DEVICES": "0,2"})]
    assert "--nproc_per_node=2" in cmds[0].argv and "--master_addr=node-b" in cmds[0].argv
    assert "CUDA_VISIBLE_DEVICES=1,3 " in cmds[0].shell()
    ds = build_commands("train.py", ["c.yml"], 4, str(h), None, 29501, launcher="deepspeed", exclude="node-c")
    assert "--exclude=node-c" in ds[0].argv and "--num_nodes=2" in ds[0].argv
    # no hostfile: include picks GPUs of this machine, as DeepSpeed's --include localhost:1
    local = build_commands("train.py", ["c.yml"], 4, None, None, 29501, include="localhost:1,2")
    assert len(local) == 1 and not local[0].remote and local[0].env == {"CUDA_VISIBLE_DEVICES": "1,2"}
    assert world_size(4, str(h), num_nodes=2) == 8 and world_size(4, None, exclude="localhost:0") == 3


def test_deepy_takes_neox_host_selection_keys(tmp_path, tiny_dataset):
    h = tmp_path / "hosts"
    h.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=1\n10.0.0.3 slots=1\n")
    cfg = tmp_path / "launch.yml"
    cfg.write_text(f"data_path: {tiny_dataset}\nhostfile: {h}\nexclude: 10.0.0.1\nnum_nodes: 2\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", "configs/tiny.yml", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "# node 0 (10.0.0.2)" in out.stdout and "# node 1 (10.0.0.3)" in out.stdout
    assert "10.0.0.1" not in out.stdout.split("# node 0")[1]
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "--num_nodes", "1", "--include", "10.0.0.3",
                          "train.py", "configs/tiny.yml", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: include and exclude are exclusive: name the hosts to use, or the ones to skip"], out.stderr


def test_deepy_default_process_count_is_one_replica_tp_pp_cp(tmp_path, tiny_dataset):
    """Without --num-procs (and no GPU), one model replica: tp x pp x cp processes (a cp=2 dry run
    used to start one process and fail with "world size 1 is not divisible")."""
    cfg = tmp_path / "cp.yml"
    cfg.write_text(f"data_path: {tiny_dataset}\ncontext_parallel_size: 2\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", "configs/tiny.yml", str(cfg)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert "--nproc_per_node=2" in out.stdout and "data-parallel 1 " in out.stdout

"""NeoX's prof.yml keys on CPU: ``profile: true`` writes a torch.profiler trace of the configured iterations,
``memory_profiling: true`` the peak RSS (a CUDA snapshot needs a GPU), and every training log line shows memory."""
import json
import re

import pytest
from conftest import tiny_config_tree
from test_neox_train import run

from megatron.config import config_from_tree
from megatron.errors import ConfigError


def test_profile_writes_a_trace_of_the_profiled_iterations(tiny_dataset, tmp_path):
    tree = tiny_config_tree(tiny_dataset, train_iters=4, log_interval=1, tensorboard_dir=str(tmp_path / "tb"),
                            profile=True, profile_step_start=1, profile_step_stop=3, memory_profiling=True,
                            memory_profiling_path=str(tmp_path / "mem"))
    logs = []
    run(tree, logs)
    traces = list((tmp_path / "tb").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list((tmp_path / "tb").iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert len(steps) == 2  # iterations 2 and 3; iteration 1 was the warm-up
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in events)
    assert any(f"profile: traces of iterations 2..3 written to {tmp_path / 'tb'}" in line for line in logs)
    peak = json.loads((tmp_path / "mem" / "peak_rss.json").read_text())
    assert peak["iteration"] == 3 and peak["peak_rss_bytes"] > 10 * 2**20
    assert any(line.startswith("memory_profiling: no CUDA here; peak RSS ") for line in logs)
    iter_lines = [line for line in logs if re.match(r"iter +\d+/4 \| loss", line)]
    assert len(iter_lines) == 4
    assert all(re.search(r"\| RSS \d+\.\d\d GiB \(peak \d+\.\d\d\) \|", line) for line in iter_lines), iter_lines


@pytest.mark.parametrize("tree, message", [
    ({"profile": True}, "profile: true writes its traces to tensorboard_dir"),
    ({"profile": True, "log_dir": "x", "profile_step_start": 5, "profile_step_stop": 5}, "expected 0 <= start < stop"),
    ({"memory_profiling": True}, "memory_profiling: true needs memory_profiling_path"),
])
def test_profiling_keys_are_checked(tree, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_tree(tree, log=lambda m: None)

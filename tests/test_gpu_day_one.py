"""GPU day one without a GPU: the run's budgets and its coverage of the CUDA tests, a step stopped at its
budget while the next still runs, the report rendered from a report JSON, and tools/apply_gpu_report.py
rewriting a copy of the dispatch table and tile configurations from that JSON.

``tests/data/gpu_day_one/gpu_day_one.json`` is a fabricated report (invented numbers) in the format the
bench scripts write; its attention figures were made by bench/attention.py's own ``figures``."""
from __future__ import annotations

import ast
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import gpu_day_one  # noqa: E402
import gpu_report  # noqa: E402

REPORT = ROOT / "tests" / "data" / "gpu_day_one" / "gpu_day_one.json"
DISPATCH = Path("megatron/attention/dispatch.py")
TRITON_SEP = Path("megatron/attention/triton_sep.py")


def load_report() -> dict:
    return json.loads(REPORT.read_text())


def test_budgets_fit_the_promise_and_every_script_exists(tmp_path):
    parts = gpu_day_one.build_parts(tmp_path, {}, {})
    one_gpu = sum(p.budget_s for p in parts if p.name != "layouts")
    assert one_gpu <= gpu_day_one.DEADLINE_S < gpu_day_one.TARGET_S
    assert tuple(p.name for p in parts) == gpu_day_one.PART_NAMES
    for bad in (["--budget", "trian=10"], ["--only", "tests,kernel"], ["--budget", "train=ten"]):
        with pytest.raises(SystemExit):  # argparse's usage line and exit 2
            gpu_day_one.parse_args(bad)
    assert gpu_day_one.parse_args(["--budget", "train=150", "--only", "tests"]).budgets == {"train": 150}
    for part in parts:
        assert part.steps and all(s.cap_s <= part.budget_s for s in part.steps), part.name
        for step in part.steps:
            target = step.argv[0] if step.argv[0] != "-m" else None
            assert target is None or (ROOT / target).is_file(), target
    assert all((ROOT / f).is_file() for f in gpu_day_one.CUDA_TEST_FILES)
    one = {p.name: p.skip for p in gpu_day_one.build_parts(tmp_path, {"cuda_available": True, "cuda_devices": 1}, {})}
    assert one["layouts"] and "need 2" in one["layouts"] and not one["train"]
    two = {p.name: p.skip for p in gpu_day_one.build_parts(tmp_path, {"cuda_available": True, "cuda_devices": 2}, {})}
    assert not any(two.values())
    none = gpu_day_one.build_parts(tmp_path, {"cuda_available": False}, {"train": 7})
    assert all(p.skip for p in none if p.name != "env") and next(p for p in none if p.name == "train").budget_s == 7


def test_every_gpu_test_lives_in_a_file_the_run_collects():
    assert gpu_day_one.cuda_tests_outside(gpu_day_one.CUDA_TEST_FILES) == []
    assert gpu_day_one.collected_per_file("tests/a.py::test_x[1]\ntests/a.py::test_y\ntests/b.py: 3\n5 tests") == {
        "tests/a.py": 2, "tests/b.py": 3}


# A step that starts a child which, like a trainer finishing its step, does not stop on SIGTERM.
SLEEPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""


def test_a_step_past_its_budget_is_stopped_and_the_run_goes_on(tmp_path):
    sleeper = gpu_day_one.Step("sleeper", ["-c", SLEEPER, str(tmp_path / "child.pid")], 30)
    quick = gpu_day_one.Step("quick", ["-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))",
                                       str(tmp_path / "work" / "quick.json")], 30, "quick.json")
    parts = [gpu_day_one.Part("slow", 6, "sleeps past its budget", [sleeper]),
             gpu_day_one.Part("next", 30, "writes a JSON", [quick])]
    (tmp_path / "work").mkdir()
    t0 = time.monotonic()
    results = gpu_day_one.run_all(tmp_path / "out", tmp_path / "work", {}, 120, parts=parts)
    assert time.monotonic() - t0 < 40
    slow, nxt = results["parts"]["slow"], results["parts"]["next"]
    assert slow["status"] == "timed out" and slow["steps"][0]["wall_s"] < 30
    assert nxt["status"] == "ok" and nxt["steps"][0]["json"] == {"x": 1}
    assert "slow / sleeper: timed out" in "\n".join(results["failures"])
    md = (tmp_path / "out" / "gpu_day_one.md").read_text()
    assert "| slow | 6 |" in md and "timed out" in md
    assert "started" in (tmp_path / "out" / "gpu_day_one.log").read_text()
    child = int((tmp_path / "child.pid").read_text())
    assert gone(child), "the step's leftover process outlived it"
    assert json.loads((tmp_path / "out" / "gpu_day_one.json").read_text())["parts"]["next"]["status"] == "ok"


def gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited (a zombie awaiting its reaper counts: it holds nothing)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_report_has_every_section_and_lists_each_failure():
    report = load_report()
    md = gpu_report.render_markdown(report)
    for heading in ("### GPU day one: NVIDIA H200", "#### CUDA tests", "#### Sep-Attention, 8 heads x 64",
                    "#### Sep-Attention, GQA 32/8 x 128", "#### Triton Sep-Attention tiles", "#### Fused kernels",
                    "#### Training throughput", "#### Parallel layouts over NCCL"):
        assert heading in md, heading
    assert "- triton vs flex at 16k: fwd 1.14x, fwd+bwd 1.31x (triton faster)" in md
    assert "| 8192 | sepllm_flex | 8 | 402,000 | 163 | 217 | 22.0% | 17.9 |" in md
    found = gpu_report.failures(report)
    assert len(found) == 4 and md.count("\n- ") >= 4
    assert any(f.startswith("kernels / norm sweep: timed out") for f in found)
    assert any("dkdv D=128 tiles [64, 64, 4, 1] differ" in f for f in found)
    assert any("seq8192_sepllm_triton: exit timeout" in f for f in found)
    broken = copy.deepcopy(report)
    broken["parts"]["tests"]["steps"][0]["json"]["tests"][0].update(outcome="failed", message="AssertionError: dq")
    assert any(f.startswith("tests: failed") and "AssertionError: dq" in f for f in gpu_report.failures(broken))


# ------------------------------------------------------------------------------ tools/apply_gpu_report.py

@pytest.fixture
def repo_copy(tmp_path) -> Path:
    root = tmp_path / "repo"
    for rel in (DISPATCH, TRITON_SEP):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    return root


def apply(report_path: Path, root: Path, capsys) -> subprocess.CompletedProcess:
    """The tool's main in this process (its import of torch is paid once); exit status and output."""
    rc = load_script("tools/apply_gpu_report.py").main([str(report_path), "--root", str(root)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], rc, out.out, out.err)


def apply_cli(report_path: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "apply_gpu_report.py"), str(report_path),
                           "--root", str(root)], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def assigned(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.AnnAssign) and node.target.id == name:
            if name == "CONFIGS":
                return {ast.literal_eval(k): tuple(ast.literal_eval(a) for a in v.args)
                        for k, v in zip(node.value.keys, node.value.values)}
            return ast.literal_eval(node.value)
    raise AssertionError(name)


def test_apply_fills_the_dispatch_table_and_faster_tiles(repo_copy, capsys):
    before = assigned(repo_copy / TRITON_SEP, "CONFIGS")
    proc = apply(REPORT, repo_copy, capsys)
    assert proc.returncode == 0, proc.stderr
    table = assigned(repo_copy / DISPATCH, "TRITON_BEATS_FLEX")
    assert list(table) == ["NVIDIA H200"] and "1.31x, 1.22x" in table["NVIDIA H200"]
    after = assigned(repo_copy / TRITON_SEP, "CONFIGS")
    assert after[("fwd", 128, True)] == (128, 64, 8, 3)  # 1.25x faster, matching results
    # within the margin (dq), a wrong result (dkdv), and every row the sweep did not touch: unchanged
    assert {k: v for k, v in after.items() if k != ("fwd", 128, True)} == \
        {k: v for k, v in before.items() if k != ("fwd", 128, True)}
    assert "tiles [64, 64, 4, 1] gave a different result" in proc.stdout
    for rel in (DISPATCH, TRITON_SEP):
        assert max(len(line) for line in (repo_copy / rel).read_text().splitlines()) <= 120
    texts = {rel: (repo_copy / rel).read_text() for rel in (DISPATCH, TRITON_SEP)}
    again = apply(REPORT, repo_copy, capsys)
    assert again.returncode == 0 and "already in the file" in again.stdout
    assert texts == {rel: (repo_copy / rel).read_text() for rel in (DISPATCH, TRITON_SEP)}


def test_apply_removes_the_device_when_flex_wins(repo_copy, tmp_path, capsys):
    assert apply(REPORT, repo_copy, capsys).returncode == 0
    report = load_report()
    for step in report["parts"]["attention"]["steps"]:
        for length in step["json"]["lengths"]:
            if length["L"] == 16384:
                length["triton_over_flex"]["fwdbwd"] = 0.8
    flex_wins = tmp_path / "flex_wins.json"
    flex_wins.write_text(json.dumps(report))
    proc = apply(flex_wins, repo_copy, capsys)
    assert proc.returncode == 0 and "flex faster" in proc.stdout
    assert assigned(repo_copy / DISPATCH, "TRITON_BEATS_FLEX") == {}
    assert "TRITON_BEATS_FLEX: Dict[str, str] = {}\n" in (repo_copy / DISPATCH).read_text()


def test_apply_refuses_a_report_whose_triton_tests_failed_or_that_names_no_device(repo_copy, tmp_path):
    original = {rel: (repo_copy / rel).read_text() for rel in (DISPATCH, TRITON_SEP)}
    report = load_report()
    report["parts"]["tests"]["steps"][0]["json"]["tests"][0]["outcome"] = "failed"
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps(report))
    no_device = tmp_path / "no_device.json"
    no_device.write_text(json.dumps({"env": {"cuda_available": False}, "parts": {}}))
    for path, words in ((failed, "triton CUDA tests failed"), (no_device, "env.device_name is missing")):
        proc = apply_cli(path, repo_copy)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], \
            proc.stderr
    assert original == {rel: (repo_copy / rel).read_text() for rel in (DISPATCH, TRITON_SEP)}


@pytest.mark.slow
def test_plan_mode_checks_every_command():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_day_one.py"), "--plan"], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plan: every command parses" in proc.stdout and "pytest -k cuda (" in proc.stdout


@pytest.mark.slow
def test_train_gpu_runs_the_trainer_end_to_end_on_cpu(tmp_path):
    """bench/train_gpu.py's pipeline on a CPU: data made from the sample, train.py per variant with the
    figures read back from metrics.jsonl; layouts through deepy.py (gloo here) equal one process."""
    def run(*args):
        out = tmp_path / f"{args[0]}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu.py"), *args, "--smoke", "--work",
                               str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())["runs"]

    runs = run("throughput", "--variants", "full,sepllm_auto", "--seqs", "128", "--steps", "3",
               "--tokens-per-step", "512")
    assert [r["variant"] for r in runs] == ["full", "sepllm_auto"]
    for r in runs:
        assert r["rc"] == 0 and r["iterations"] == 3 and r["tokens_per_sec"] > 0 and r["micro_batch"] == 4
    layouts = run("layouts", "--layouts", "tp2,dp2", "--steps", "2")
    assert [r["layout"] for r in layouts] == ["1gpu", "tp2", "dp2"]
    assert all(r["equal"] for r in layouts[1:]), layouts

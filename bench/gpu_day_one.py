#!/usr/bin/env python
"""GPU day one: every GPU path of the project, checked and timed by one command in under 8 minutes on
one H200, with one markdown report and one JSON for bench/RESULTS.md.

    bench/gpu_day_one.sh OUT_DIR          # on a CUDA machine (make gpu-check: OUT_DIR bench/out/gpu_day_one)
    bench/gpu_day_one.sh --plan           # anywhere: check every command parses, print the plan and budgets

Parts, in order, each stopped at its time budget by ``timeout`` (``--budget part=seconds`` changes one),
all of them by ``--deadline`` seconds in total:
  env      nvidia-smi, driver, CUDA, torch, triton, flash_attn; carried wheels (``.whl/``) installed; the
           CUDA torch wheel only where the machine has a GPU and its torch has no CUDA; measured ceilings
           (device-to-device copy GB/s, bf16 8192^3 matmul TFLOP/s)
  tests    every ``-k cuda`` test (flex, triton Sep-Attention, fused kernels, fused model) -- first, so a
           wrong result is known before any timing
  attention  bench/attention.py fwd+bwd at 4k-32k on real-text separators: sdpa, sdpa pinned to flash,
           flash_attn (when installed), flex, triton; Pythia-like 8x64 heads and GQA 32/8 x 128
  tiles    bench/triton_tiles.py: Triton Sep-Attention tile sizes and special-pass chunking at 16k
  kernels  bench/kernels.py --quick: RoPE, norms, cross-entropy vs eager and torch.compile, % of peak
           bandwidth; then the norm launch-parameter sweep
  train    bench/train_gpu.py throughput: 30 steps of configs/pythia/160M.yml at 8k and 2k, full vs
           Sep-Attention (flex, triton): tokens/s, MFU, peak memory
  layouts  bench/train_gpu.py layouts: TP2 / PP2 / DP2 / CP2 over NCCL equal one GPU (2+ GPUs; else
           skipped with the reason)

OUT_DIR receives gpu_day_one.md, gpu_day_one.json and gpu_day_one.log, rewritten after every step, so a
run cut short still leaves its report. ``tools/apply_gpu_report.py OUT_DIR/gpu_day_one.json`` then
fills ``dispatch.TRITON_BEATS_FLEX`` and the Triton tile configurations from it.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import gpu_report  # noqa: E402

TARGET_S = 480  # the promise: under 8 minutes on one H200
DEADLINE_S = 470
RESERVE_S = 5  # kept back from the deadline for the final report
CUDA_TEST_FILES = ("tests/test_sep_attention_flex.py", "tests/test_sep_attention_triton.py",
                   "tests/test_kernels.py", "tests/test_model_fused.py")
TEXT = ["--tokenizer", "data/sample/tokenizer.json", "--text", "data/sample/corpus.jsonl"]
SEQS = "16384,4096,8192,32768"  # 16k first: its figures decide the targets and TRITON_BEATS_FLEX
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
PART_NAMES = ("env", "tests", "attention", "tiles", "kernels", "train", "layouts")  # build_parts, in order


@dataclass
class Step:
    label: str
    argv: List[str]  # a Python script (or -m module) and its arguments, run by this interpreter from ROOT
    cap_s: int  # the most this step may take (less when its part or the run is short of time)
    json_name: Optional[str] = None  # the step writes WORK/json_name via --json
    post: Optional[Callable[[Path], Dict[str, Any]]] = None  # reads the step's outputs into its JSON


@dataclass
class Part:
    name: str
    budget_s: int
    what: str
    steps: List[Step] = field(default_factory=list)
    skip: Optional[str] = None  # why the part does not run here


# ------------------------------------------------------------------------------------------ the parts

def junit_summary(xml_path: Path) -> Dict[str, Any]:
    """Every test of a pytest --junitxml file: name, outcome, first line of the message."""
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
        tests.append({"name": f"{case.get('classname', '')}::{case.get('name')}", "outcome": outcome,
                      "message": message})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def build_parts(work: Path, env: Dict[str, Any], budgets: Dict[str, int]) -> List[Part]:
    """The run, given what the env part found (``env`` is empty in --plan mode)."""
    gpus = env.get("cuda_devices", 0)
    pytest_args = ["-m", "pytest", *CUDA_TEST_FILES, "-k", "cuda", "-m", "not slow", "-rfEs", "--timeout", "150",
                   "--junitxml", str(work / "junit.xml")]  # pytest.ini adds -q and -p no:cacheprovider
    if env.get("modules", {}).get("xdist"):
        pytest_args += ["-n", "4"]  # the flex tests compile; 4 workers share the 16 cores
    attention = ["bench/attention.py", "--device", "cuda", *TEXT, "--seqs", SEQS,
                 "--impls", "sdpa,sdpa_flash,flash,flex,triton", "--repeats", "10"]
    parts = [
        Part("env", 25, "versions, driver, installs (carried wheels; CUDA torch only if missing), ceilings",
             [Step("environment", ["bench/gpu_day_one.py", "--env-json", str(work / "env.json")], 25, "env.json")]),
        Part("tests", 90, "every -k cuda test: flex, triton Sep-Attention, fused kernels, fused model",
             [Step("pytest -k cuda", pytest_args, 90, post=lambda w: junit_summary(w / "junit.xml"))]),
        Part("attention", 100, "Sep-Attention fwd+bwd 4k-32k, real-text separators, vs dense causal",
             [Step("8 heads x 64", attention + ["--json", str(work / "attention_h8_d64.json")], 55,
                   "attention_h8_d64.json"),
              Step("GQA 32/8 x 128", attention + ["--heads", "32", "--kv-heads", "8", "--dim", "128", "--json",
                                                  str(work / "attention_gqa_d128.json")], 50,
                   "attention_gqa_d128.json")]),
        Part("tiles", 50, "Triton Sep-Attention tile sizes and special-pass chunks at 16k",
             [Step("tile sweep", ["bench/triton_tiles.py", "--json", str(work / "tiles.json")], 50, "tiles.json")]),
        Part("kernels", 70, "fused RoPE / norms / cross-entropy vs eager and torch.compile, % of peak bandwidth",
             [Step("kernels", ["bench/kernels.py", "--quick", "--json", str(work / "kernels.json")], 50,
                   "kernels.json"),
              Step("norm sweep", ["bench/kernels.py", "--sweep-norm", "--quick", "--json",
                                  str(work / "norm_sweep.json")], 25, "norm_sweep.json")]),
        Part("train", 120, "30 steps of Pythia-160M at 8k and 2k: full vs Sep-Attention (flex, triton)",
             [Step("throughput", ["bench/train_gpu.py", "throughput", "--work", str(work / "train"),
                                  "--run-timeout", "75", "--json", str(work / "train.json")], 120, "train.json")]),
        Part("layouts", 60, "TP2 / PP2 / DP2 / CP2 over NCCL equal one GPU",
             [Step("layouts", ["bench/train_gpu.py", "layouts", "--work", str(work / "layouts"),
                               "--run-timeout", "50", "--json", str(work / "layouts.json")], 60, "layouts.json")]),
    ]
    for part in parts:
        part.budget_s = budgets.get(part.name, part.budget_s)
        if env and part.name == "layouts" and gpus < 2:
            part.skip = f"{gpus} CUDA device(s) here; the NCCL layout checks need 2"
        elif env and part.name not in ("env",) and not env.get("cuda_available"):
            part.skip = "no CUDA device usable by torch here (see env)"
    return parts


# ------------------------------------------------------------------------------------------ the env part

def module_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    found: Dict[str, Optional[str]] = {}
    for module, dist in (("torch", "torch"), ("triton", "triton"), ("flash_attn", "flash-attn"),
                         ("deepspeed", "deepspeed"), ("transformers", "transformers"), ("xdist", "pytest-xdist"),
                         ("pytest_timeout", "pytest-timeout"), ("tokenizers", "tokenizers"), ("yaml", "PyYAML")):
        if importlib.util.find_spec(module) is None:
            found[module] = None
            continue
        try:
            found[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[module] = "present"
    return found


def install_missing(work: Path) -> List[str]:
    """Carried wheels (``.whl/*.whl``, see the device notes) into WORK/site; a CUDA torch wheel only when
    a GPU is present and this interpreter's torch has no CUDA. Returns what was done, one line each."""
    done: List[str] = []
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--target", str(work / "site"), *map(str, wheels)], capture_output=True, text=True)
        done.append(f"carried wheels ({len(wheels)}): " + ("installed" if proc.returncode == 0 else
                                                           "FAILED " + proc.stderr.strip()[-300:]))
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    has_cuda_torch = subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    gpu_present = bool(shutil.which("nvidia-smi")) and subprocess.run(["nvidia-smi", "-L"],
                                                                       capture_output=True).returncode == 0
    if gpu_present and not has_cuda_torch:
        index = os.environ.get("TORCH_CUDA_INDEX", TORCH_CUDA_INDEX)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torch", "--index-url", index],
                              capture_output=True, text=True, timeout=240)
        done.append(f"torch with CUDA from {index}: " + ("installed" if proc.returncode == 0 else
                                                         "FAILED " + proc.stderr.strip()[-300:]))
    return done


def nvidia_smi() -> Dict[str, str]:
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,clocks.mem,power.limit,temperature.gpu"
    if not shutil.which("nvidia-smi"):
        return {}
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                          text=True)
    first = proc.stdout.strip().splitlines()[:1]
    return dict(zip(fields.split(","), (v.strip() for v in first[0].split(",")))) if first else {}


def measure_ceilings() -> Dict[str, float]:
    """Device-to-device copy (bytes read + written) and a bf16 8192^3 matmul on random data."""
    import torch

    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def timed(fn: Callable[[], object], n: int) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    copy_s = timed(lambda: dst.copy_(src), 20)
    mm_s = timed(lambda: a @ b, 20)
    return {"copy_gbps": 2 * src.numel() * 2 / copy_s / 1e9, "bf16_matmul_tflops": 2 * 8192**3 / mm_s / 1e12}


def collect_env(work: Path) -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                           "installs": install_missing(work)}
    site = work / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))
    env["modules"] = module_versions()
    env["nvidia_smi"] = nvidia_smi()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
        if shutil.which("git") else None  # a copied working tree may have no .git, a machine no git
    env["git_commit"] = commit.stdout.strip() if commit and commit.returncode == 0 else None
    try:
        import torch
    except Exception as exc:  # the report says why nothing else ran
        env["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return env
    env.update(cuda_available=torch.cuda.is_available(), cuda_devices=torch.cuda.device_count(),
               torch_cuda=torch.version.cuda)
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
        env["ceilings"] = measure_ceilings()
    return env


# ------------------------------------------------------------------------------------------ running

def child_env(work: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT)] + ([str(work / "site")] if (work / "site").is_dir() else []) + [env.get("PYTHONPATH", "")]
    cache = Path(tempfile.gettempdir()) / "gpu_day_one_cache"  # kept between runs on one machine: a rerun compiles less
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"))
    return env


def run_step(step: Step, limit: float, work: Path, log) -> Dict[str, Any]:
    """Run one step under ``timeout``; its output goes to the log. Status: ok, failed, timed out."""
    argv = [sys.executable, *step.argv]
    command = (["timeout", "--kill-after=10", f"{max(1, int(limit))}"] if shutil.which("timeout") else []) + argv
    log.write(f"\n===== {step.label}: {shlex.join(step.argv)} (limit {int(limit)} s)\n")
    log.flush()
    t0 = time.monotonic()
    # Its own process group: whatever the step leaves behind is killed with it. A training run stops
    # gracefully on SIGTERM (after its current step), so a timed-out step's trainer could otherwise
    # outlive it and hold the GPU while the next part is timed.
    proc = subprocess.Popen(command, cwd=ROOT, env=child_env(work), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=limit + 30)
    except subprocess.TimeoutExpired:  # only without coreutils timeout, or if it could not stop the step
        rc = 124
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    wall = time.monotonic() - t0
    timed_out = rc in (124, 137) and wall >= limit - 1
    result: Dict[str, Any] = {"label": step.label, "argv": step.argv, "rc": rc, "wall_s": round(wall, 1),
                              "limit_s": int(limit), "status": "timed out" if timed_out else
                              ("ok" if rc == 0 else "failed")}
    try:
        if step.post is not None:
            result["json"] = step.post(work)
        elif step.json_name and (work / step.json_name).exists():
            result["json"] = json.loads((work / step.json_name).read_text())
    except (OSError, ValueError, SyntaxError) as exc:  # missing, half-written (JSON) or cut (XML) output
        result["json_error"] = f"{type(exc).__name__}: {exc}"[:300]
    log.write(f"===== {step.label}: {result['status']} (rc {rc}, {wall:.0f} s)\n")
    log.flush()
    return result


def run_all(out: Path, work: Path, budgets: Dict[str, int], deadline: float, only: Optional[List[str]] = None,
            parts: Optional[List[Part]] = None) -> Dict[str, Any]:
    """Every part in order, each step limited by its cap, its part's budget and the run's deadline."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: Dict[str, Any] = {"date": datetime.date.today().isoformat(), "target_s": TARGET_S,
                               "deadline_s": deadline, "parts": {}, "env": {}}
    with open(out / "gpu_day_one.log", "a", buffering=1) as log:
        todo = parts if parts is not None else build_parts(work, {}, budgets)[:1]
        index = 0
        while index < len(todo):
            part = todo[index]
            index += 1
            entry: Dict[str, Any] = {"budget_s": part.budget_s, "what": part.what, "steps": []}
            results["parts"][part.name] = entry
            if only and part.name not in only and part.name != "env":
                entry.update(status="not selected", used_s=0)
            elif part.skip:
                entry.update(status="skipped", reason=part.skip, used_s=0)
            else:
                part_start = time.monotonic()
                for step in part.steps:
                    left_part = part.budget_s - (time.monotonic() - part_start)
                    left_run = deadline - RESERVE_S - (time.monotonic() - start)
                    limit = min(step.cap_s, left_part, left_run)
                    if limit < 5:
                        entry["steps"].append({"label": step.label, "argv": step.argv, "status": "skipped",
                                               "reason": "out of time (part budget or run deadline)"})
                        continue
                    entry["steps"].append(run_step(step, limit, work, log))
                    done = entry["steps"][-1]
                    print(f"[{time.monotonic() - start:4.0f} s] {part.name} / {step.label}: {done['status']} "
                          f"({done['wall_s']:.0f} of {int(limit)} s)", flush=True)  # progress, if the run is cut
                    gpu_report.write(out, results)
                entry["used_s"] = round(time.monotonic() - part_start, 1)
                entry["status"] = gpu_report.part_status(entry["steps"])
            if part.name == "env" and parts is None:
                env_step = entry["steps"][0] if entry["steps"] else {}
                results["env"] = env_step.get("json", {}) if isinstance(env_step.get("json"), dict) else {}
                todo += build_parts(work, results["env"] or {"cuda_available": False}, budgets)[1:]
            results["elapsed_s"] = round(time.monotonic() - start, 1)
            gpu_report.write(out, results)
    return results


# ------------------------------------------------------------------------------------------ --plan

def cuda_tests_outside(files: Sequence[str]) -> List[str]:
    """Test functions named for CUDA in test files that are not in ``files`` (they would be missed)."""
    missed = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if str(path.relative_to(ROOT)) in files:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and "cuda" in node.name.lower():
                missed.append(f"{path.relative_to(ROOT)}::{node.name}")
    return missed


def collected_per_file(output: str) -> Dict[str, int]:
    """Tests per file from ``pytest --collect-only`` output, in its -q (``file::test``) or -qq (``file: N``) form."""
    counts: Dict[str, int] = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+\.py)(?:::\S.*|: (\d+))$", line.strip())
        if match:
            counts[match[1]] = counts.get(match[1], 0) + (int(match[2]) if match[2] else 1)
    return counts


_LOADING = threading.Lock()


def parse_with_script(script: str, argv: List[str]) -> Optional[str]:
    """The script's own parse_args on the exact arguments the run passes; None when they parse."""
    with _LOADING:  # plan checks run on threads; load each script once, one at a time
        name = f"plan_{Path(script).stem}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, ROOT / script)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up while the script loads
            spec.loader.exec_module(module)
        try:
            module.parse_args(argv)
        except SystemExit as exc:
            return f"{script} rejects its arguments (exit {exc.code})"
    return None


def plan_check(step: Step, work: Path) -> Optional[str]:
    """What would stop this step from starting (None: it parses and its inputs exist)."""
    env = child_env(work)
    script = step.argv[0]
    if script == "-m":  # pytest: the cuda tests collect, every file holds some, none lives elsewhere
        argv = [a for a in step.argv if a not in ("-n", "4")] + ["--collect-only"]
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        per_file = collected_per_file(proc.stdout)
        empty = [f for f in CUDA_TEST_FILES if not per_file.get(f)]
        outside = cuda_tests_outside(CUDA_TEST_FILES)
        if proc.returncode != 0 or empty or outside:
            return (f"collection rc {proc.returncode}; files without cuda tests: {empty}; cuda tests outside "
                    f"CUDA_TEST_FILES: {outside}; {(proc.stdout + proc.stderr).strip()[-300:]}")
        step.label += f" ({sum(per_file.values())} tests)"
        return None
    if script == "bench/gpu_day_one.py":
        proc = subprocess.run([sys.executable, *step.argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        return None if proc.returncode == 0 else f"env probe rc {proc.returncode}: {proc.stderr.strip()[-300:]}"
    help_run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    if help_run.returncode != 0:
        return f"{script} --help: rc {help_run.returncode}: {help_run.stderr.strip()[-300:]}"
    if script == "bench/train_gpu.py":  # makes the data and dry-runs every config through deepy.py
        proc = subprocess.run([sys.executable, *step.argv, "--plan"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        return None if proc.returncode == 0 else f"{' '.join(step.argv[:2])} --plan: {proc.stdout[-600:]}"
    return parse_with_script(script, step.argv[1:])


def plan(budgets: Dict[str, int], deadline: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = build_parts(work, {}, budgets)
        steps = [(part, step) for part in parts for step in part.steps]
        with ThreadPoolExecutor(max_workers=3) as pool:  # each check is a subprocess
            verdicts = list(pool.map(lambda ps: plan_check(ps[1], work), steps))
        problems = []
        for (part, step), why in zip(steps, verdicts):
            if why:
                step.label += "  <-- " + why
                problems.append(f"{part.name} / {step.label}")
        print(gpu_report.plan_text(parts, deadline, TARGET_S))
        print(f"plan: {len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems) if problems
              else "plan: every command parses and its inputs exist")
    total = sum(p.budget_s for p in parts if p.name != "layouts")
    if total > deadline:
        print(f"plan: single-GPU budgets sum to {total} s, over the {deadline:.0f} s deadline")
        return 1
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------ entry point

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(ROOT / "bench" / "out" / "gpu_day_one"),
                   help="where the report goes (default bench/out/gpu_day_one)")
    p.add_argument("--plan", action="store_true", help="no GPU needed: check every command, print the plan")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="change one part's budget")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run")
    p.add_argument("--only", default=None, help="comma list of parts to run (env always runs)")
    p.add_argument("--env-json", default=None, help=argparse.SUPPRESS)  # the env part's own process
    args = p.parse_args(argv)
    budgets = {}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if not seconds.isdigit() or name not in PART_NAMES:
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PART_NAMES)}")
        budgets[name] = int(seconds)
    args.budgets = budgets
    args.only = args.only.split(",") if args.only else None
    unknown = [name for name in args.only or [] if name not in PART_NAMES]
    if unknown:
        p.error(f"--only {','.join(unknown)}: not a part; parts: {', '.join(PART_NAMES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.env_json:
        env = collect_env(Path(args.env_json).parent)
        Path(args.env_json).write_text(json.dumps(env, indent=1) + "\n")
        print(json.dumps(env, indent=1))
        return 0
    if args.plan:
        return plan(args.budgets, args.deadline)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gpu_day_one.") as tmp:
        results = run_all(out, Path(tmp), args.budgets, args.deadline, args.only)
    print(gpu_report.summary_text(results, out))
    return 0 if not gpu_report.failures(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""impl 'triton': our Sep-Attention Triton kernels, run by Triton's CPU interpreter, against the fp64
reference (output, dq, dk, dv), a tiny model trained through them against the compact path, the
dispatch rules, and the kernels lowered to sm_90 / sm_80 cubins.

The interpreter must be enabled before Triton is imported, so the kernel checks run in one
subprocess (this file as a script) that reports every case back as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from test_sep_attention import (  # noqa: E402
    BF16_RTOL,
    FP32_RTOL,
    make_inputs,
    random_documents,
    random_separators,
    reference_fp64,
    rel_err,
    run_with_grads,
)

from megatron.attention import dispatch  # noqa: E402
from megatron.attention.sepllm_rule import SepRule, separator_flags  # noqa: E402

# name: (B, Hq, Hkv, L, D, separator density, n_init, n_local, mean document length or None, blocks)
# blocks = (BLOCK_M, BLOCK_N) for every kernel; None = the shipped GPU configuration.
CASES = {
    "odd_L_window_below_block": (1, 2, 2, 45, 16, 0.2, 3, 5, None, (16, 16)),
    "gqa_window_above_block": (1, 4, 2, 77, 24, 0.15, 3, 40, None, (16, 16)),
    "no_separators": (1, 2, 1, 50, 8, 0.0, 2, 8, None, (16, 16)),
    "no_specials_at_all": (1, 2, 2, 40, 8, 0.0, 0, 6, None, (16, 16)),
    "all_separators": (1, 2, 2, 50, 8, 1.0, 3, 8, None, (16, 32)),
    "documents_gqa": (2, 2, 1, 90, 16, [0.1, 0.3], 3, 12, 20, (16, 16)),
    "shipped_blocks_head_dim_64": (1, 2, 1, 150, 64, 0.12, 3, 16, 60, None),
}
SPECIAL_CHUNKS = {"gqa_window_above_block": 2, "documents_gqa": 3, "all_separators": 5}  # else 1 (CPU default)
HALF_CASES = {  # 16-bit inputs, fp32 accumulation: (dtype, head dim)
    "bf16_head_dim_128": (torch.bfloat16, 128),
    "fp16_head_dim_64": (torch.float16, 64),
}


def check_case(B, Hq, Hkv, L, D, density, n_init, n_local, doc_len, blocks, dtype=torch.float32,
               mode: str = "sepllm", is_sep: Optional[torch.Tensor] = None, docs: Optional[torch.Tensor] = None,
               strided: bool = False, device: str = "cpu", chunks: Optional[int] = None) -> str:
    """Run the kernels fwd + bwd and compare with the fp64 reference; returns the worst errors."""
    from megatron.attention.triton_sep import triton_sep_attention

    q, k, v, grad = (t.to(device) for t in make_inputs(B, Hq, Hkv, L, D, dtype=dtype))
    if strided:  # like the model: q, k stored [B, L, H, D] (after rotary), v in another layout
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    if is_sep is None:
        is_sep = random_separators(B, L, density)
    if docs is None and doc_len:
        docs = random_documents(B, L, doc_len)
    is_sep, docs = is_sep.to(device), (docs.to(device) if docs is not None else None)
    rule = SepRule(mode, n_init, n_local, separate_documents=docs is not None)
    got = run_with_grads(lambda a, b, c: triton_sep_attention(a, b, c, is_sep, rule, docs, blocks=blocks,
                                                              special_chunks=chunks), q, k, v, grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule, docs)
    tol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    assert all(a.dtype == dtype for a in got), [a.dtype for a in got]
    assert max(errors.values()) <= tol, {n: f"{e:.1e}" for n, e in errors.items()}
    return ", ".join(f"{n} {e:.0e}" for n, e in errors.items())


def mode_cases() -> Dict[str, Callable[[], str]]:
    """Every mode reduces to is_sep flags (sepllm_rule.separator_flags); 'full' runs the kernel itself."""
    tokens = torch.randint(0, 50, (1, 61), generator=torch.Generator().manual_seed(5))
    cases = {}
    for mode in ("sepllm", "streamingllm", "fixed_interval", "full"):
        rule = SepRule(mode, n_init=3, n_local=9, interval=5)
        flags = separator_flags(tokens, rule, separator_ids=torch.tensor([1, 7, 13, 42]))
        cases[f"mode_{mode}"] = lambda mode=mode, flags=flags: check_case(
            1, 2, 1, 61, 8, None, 3, 9, None, (16, 16), mode=mode, is_sep=flags)
    return cases


def per_layer_windows() -> str:
    """Layers with different windows share one cached plan (it does not depend on n_local)."""
    from megatron.attention import triton_plan

    is_sep = random_separators(1, 50, 0.15)
    results = [check_case(1, 2, 2, 50, 8, None, 2, w, None, (16, 16), is_sep=is_sep) for w in (3, 33)]
    plans = {id(triton_plan.cached_tile_plan(is_sep, SepRule("sepllm", 2, w))) for w in (3, 16, 33)}
    assert len(plans) == 1, "one plan per step, whatever the layer's window"
    return "; ".join(results)


def repeated_document_ids() -> str:
    """Ids that repeat (A B A): runs bound nothing, the document mask decides."""
    docs = torch.cat([torch.zeros(20), torch.ones(25), torch.zeros(18)]).long()[None]
    return check_case(1, 2, 2, 63, 8, 0.15, 3, 8, None, (16, 16), docs=docs.contiguous(), strided=True)


def through_attend() -> str:
    from megatron.attention import attend

    q, k, v, grad = make_inputs(1, 4, 2, 33, 8)
    is_sep = random_separators(1, 33, 0.2)
    rule = SepRule("sepllm", 2, 4)
    got = run_with_grads(lambda a, b, c: attend(a, b, c, is_sep, rule, impl="triton"), q, k, v, grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule)
    worst = max(rel_err(a, b) for a, b in zip(got, want))
    assert worst <= FP32_RTOL, worst
    return f"worst {worst:.0e}"


def train_losses(data_prefix: str, impl: str) -> list:
    """A few steps of a tiny GQA model with documents and per-layer windows through the Trainer."""
    from conftest import tiny_config_tree

    from megatron.config import config_from_tree
    from megatron.training.trainer import Trainer

    tree = tiny_config_tree(data_prefix, train_iters=3, num_kv_heads=2, train_micro_batch_size_per_gpu=2,
                            attention={"impl": impl, "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 8,
                                                                 "layer_n_local": {1: 4}, "separate_documents": True}})
    return Trainer(config_from_tree(tree), log=lambda m: None).train()


def interpreter_checks(only: Optional[str]) -> Dict[str, str]:
    """Runs in the TRITON_INTERPRET=1 subprocess: every case through the real kernels."""
    checks: Dict[str, Callable[[], str]] = {name: (lambda c=c, n=name: check_case(*c, chunks=SPECIAL_CHUNKS.get(n)))
                                            for name, c in CASES.items()}
    for name, (dtype, D) in HALF_CASES.items():
        checks[name] = lambda dtype=dtype, D=D: check_case(1, 2, 1, 37, D, 0.15, 2, 8, 15, (16, 16), dtype=dtype)
    checks.update(mode_cases())
    checks.update(per_layer_windows=per_layer_windows, repeated_document_ids=repeated_document_ids,
                  through_attend=through_attend)
    results: Dict[str, str] = {}
    for name, fn in checks.items():
        if only and not name.startswith(only):
            continue
        try:
            results[name] = "ok: " + fn()
        except Exception as exc:  # reported back to pytest as text
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    return results


def run_script(args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def interpreter_results() -> Dict[str, str]:
    proc = run_script(["--interpreter-checks"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHECK_NAMES = (list(CASES) + list(HALF_CASES) + [f"mode_{m}" for m in ("sepllm", "streamingllm", "fixed_interval",
                                                                      "full")]
               + ["per_layer_windows", "repeated_document_ids", "through_attend"])


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_triton_kernels_in_interpreter_match_fp64_reference(interpreter_results, name):
    assert interpreter_results.get(name, "missing").startswith("ok"), interpreter_results.get(name, interpreter_results)


def test_tiny_model_trained_through_triton_equals_compact(tiny_dataset):
    proc = run_script(["--train", tiny_dataset])
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses["triton"]) == 3 and losses["triton"] == pytest.approx(losses["compact"], rel=1e-5, abs=1e-5), \
        losses


# --- dispatch (in process, no interpreter) --------------------------------------------------------

def test_triton_on_cpu_without_interpreter_is_one_config_error(monkeypatch):
    from megatron.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="attention.impl 'triton' needs a CUDA device") as err:
        dispatch.check_impl_available("triton", torch.device("cpu"))
    assert "\n" not in str(err.value)
    for impl in dispatch.IMPLS:
        if impl != "triton":
            dispatch.check_impl_available(impl, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.check_impl_available("triton", torch.device("cpu"))


def test_train_cli_refuses_triton_on_cpu_before_training(tiny_dataset, tmp_path, monkeypatch, capsys):
    from conftest import tiny_config_tree, write_config

    import train

    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = write_config(tmp_path / "t.yml", tiny_config_tree(tiny_dataset, attention={"impl": "triton"}))
    assert train.main([cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: attention.impl 'triton' needs a CUDA device"), err


def test_auto_picks_triton_only_on_devices_recorded_as_faster(monkeypatch):
    cuda_q = type("FakeCudaTensor", (), {"is_cuda": True, "device": torch.device("cuda", 0)})()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert dispatch.auto_impl(torch.zeros(1)) == "compact"
    assert dispatch.auto_impl(cuda_q) == "flex"
    monkeypatch.setitem(dispatch.TRITON_BEATS_FLEX, "NVIDIA H100 80GB HBM3", "bench/RESULTS.md, test")
    assert dispatch.auto_impl(cuda_q) == "triton"
    assert dispatch.auto_impl(torch.zeros(1)) == "compact"


def test_triton_config_value_is_accepted():
    from megatron.config import config_from_tree

    assert config_from_tree({"attention": {"impl": "triton"}}).attention.impl == "triton"


# --- on a GPU (skipped without one): realistic shapes, the shipped tile sizes --------------------

CUDA_CASES = {  # as CASES, plus the dtype
    "bf16_d128_gqa_documents": (2, 8, 2, 2048, 128, 0.12, 3, 64, 400, None, torch.bfloat16),
    "bf16_d64_window_1024": (1, 4, 4, 4096, 64, 0.12, 3, 1024, None, None, torch.bfloat16),
    "fp16_d64_odd_length": (2, 4, 1, 1001, 64, [0.05, 0.3], 3, 64, None, None, torch.float16),
    "bf16_d256": (1, 2, 1, 777, 256, 0.12, 3, 100, None, None, torch.bfloat16),
    "fp32_d80_documents": (1, 2, 2, 777, 80, 0.15, 3, 100, 100, None, torch.float32),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_triton_kernels_on_cuda_match_fp64_reference(name):
    *case, dtype = CUDA_CASES[name]
    check_case(*case, dtype=dtype, device="cuda")


# --- ahead-of-time lowering (no GPU) --------------------------------------------------------------

def run_aot(args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "megatron.attention.triton_aot", *args],
                          capture_output=True, text=True, timeout=3000, cwd=ROOT, env=env)


def check_aot(args, expect_lines: int) -> None:
    pytest.importorskip("triton")
    proc = run_aot(args)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]  # non-zero also when a 16-bit variant spills
    lines = [line for line in proc.stdout.splitlines() if "regs=" in line]
    assert len(lines) == expect_lines, proc.stdout


def test_sep_attention_kernels_lower_to_sm90_quick():
    """bf16, head dim 128, documents: the forward and the special dK/dV kernel (the two largest)
    compile for sm_90 without spills; the slow test below lowers a sample of every kind."""
    check_aot(["--quick", "--arch", "90"], expect_lines=2)


def test_aot_sweep_fails_on_a_spilling_16_bit_variant_only():
    pytest.importorskip("triton")
    from megatron.attention.triton_aot import spilling
    from megatron.kernels.aot_check import CompileReport

    reports = [CompileReport("sep_dq_kernel[D=64,bf16,docs=ids,M=128,N=32]", 8, 255, 8),
               CompileReport("sep_fwd_kernel[D=128,fp32,docs=none,M=32,N=16]", 4, 255, 52),
               CompileReport("sep_fwd_kernel[D=128,fp16,docs=none,M=128,N=32]", 8, 232, 0),
               CompileReport("sep_dq_kernel[D=256,fp16,docs=contig,M=32,N=32]", 4, None, None)]
    assert spilling(reports) == [reports[0].name, reports[3].name]  # no spill count read: not known to fit


@pytest.mark.slow
@pytest.mark.heavy  # 4.5 minutes on a fresh clone: make test-all, not CI's 45-minute budget
@pytest.mark.timeout(1800)  # 36 compiles: ~3 minutes on 2 idle cores, over 10 on a loaded box
@pytest.mark.parametrize("arch", [90, 80])
def test_every_sep_attention_kernel_dtype_and_head_dim_lowers(arch):
    """Each kernel x dtype x head dim once (36 of the 108 shipped variants, the document variants
    rotating); ``make aot-check`` lowers all 108 for both architectures."""
    from megatron.attention.triton_aot import shipped_variants

    check_aot(["--sample", "--arch", str(arch)], expect_lines=len(list(shipped_variants("sample"))))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    if "--train" in sys.argv:
        prefix = sys.argv[sys.argv.index("--train") + 1]
        print(json.dumps({impl: train_losses(prefix, impl) for impl in ("compact", "triton")}))
    else:
        only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
        print(json.dumps(interpreter_checks(only)))

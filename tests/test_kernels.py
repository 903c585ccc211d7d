"""Fused kernels: eager fallbacks and Triton kernels (through Triton's CPU interpreter) against fp64
references written here, dispatch, lazy Triton import, and an ahead-of-time sm_90 compile.

The Triton checks run in a subprocess (this file as a script, with TRITON_INTERPRET=1 set before
anything imports triton), so they work whatever the rest of the suite already imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

from megatron import kernels  # noqa: E402
from megatron.kernels import dispatch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# fp64 references (deliberately not the eager code: rotary as an explicit rotation matrix per
# position, norms and cross-entropy straight from their formulas).
# ---------------------------------------------------------------------------------------------

def ref_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
               interleaved: bool) -> torch.Tensor:
    B, L, H, D = x.shape
    half = rotary_dim // 2
    pair = torch.arange(half)
    first, second = (2 * pair, 2 * pair + 1) if interleaved else (pair, pair + half)
    c = cos.double().expand(B, L, half)
    s = sin.double().expand(B, L, half)
    rot = torch.zeros(B, L, rotary_dim, rotary_dim, dtype=torch.float64)
    rot[..., first, first] = c
    rot[..., first, second] = -s
    rot[..., second, first] = s
    rot[..., second, second] = c
    xd = x.double()
    rotated = torch.einsum("blij,blhj->blhi", rot, xd[..., :rotary_dim])
    return torch.cat((rotated, xd[..., rotary_dim:]), dim=-1)


def ref_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool):
    x = x.double()
    if rms:
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    else:
        centred = x - x.mean(-1, keepdim=True)
        y = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps)
    y = y * weight.double()
    return y + bias.double() if bias is not None else y


def ref_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    z = logits.double()
    top = z.max(-1, keepdim=True).values
    lse = (top + torch.log(torch.exp(z - top).sum(-1, keepdim=True))).squeeze(-1)
    keep = targets != ignore_index
    picked = z.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return torch.where(keep, lse - picked, torch.zeros_like(lse))


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _leaf(t: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return t.to(device, dtype).detach().requires_grad_(True)


def _ref_leaf(t: torch.Tensor) -> torch.Tensor:
    """The fp64 reference's copy of an input, on the CPU whatever device the kernel ran on."""
    return t.detach().cpu().double().requires_grad_(True)


def compare(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
            ref_inputs: Sequence[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """Forward outputs and input grads (for a random upstream grad) against the fp64 reference (on the CPU)."""
    tol = TOL[dtype]
    for i, (o, r) in enumerate(zip(out, ref)):
        torch.testing.assert_close(o.double().cpu(), r, **tol, msg=lambda m: f"{what} output {i}: {m}")
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in out]
    grads = torch.autograd.grad([o for o in out], list(inputs),
                                [u.to(o.device, o.dtype) for u, o in zip(upstream, out)])
    ref_grads = torch.autograd.grad(list(ref), list(ref_inputs), upstream)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        scale = max(1.0, r.abs().max().item())  # weight grads sum over rows
        torch.testing.assert_close(g.double().cpu() / scale, r / scale, **tol,
                                   msg=lambda m: f"{what} grad {i}: {m}")


# ---------------------------------------------------------------------------------------------
# Cases, shared by the eager tests (in process) and the Triton checks (in the interpreter).
# ---------------------------------------------------------------------------------------------

def rotary_case(fused: Optional[bool], B: int, L: int, Hq: int, Hk: int, D: int, rotary_dim: int,
                interleaved: bool, dtype: torch.dtype, batch_cos: bool, strided_k: bool, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(B * 100 + Hq * 10 + D + rotary_dim + int(interleaved))
    q = _leaf(torch.randn(B, L, Hq, D, generator=g), dtype, device)
    if strided_k:  # k sliced out of a fused [.., Hk, 3, D] projection, as the model does
        k_full = _leaf(torch.randn(B, L, Hk, 3, D, generator=g), dtype, device)
        k = k_full[:, :, :, 1]
    else:
        k_full = k = _leaf(torch.randn(B, L, Hk, D, generator=g), dtype, device)
    angles = torch.rand(B if batch_cos else 1, L, rotary_dim // 2, generator=g) * 6.0
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = kernels.apply_rotary_qk(q, k, cos.to(device), sin.to(device), rotary_dim, interleaved, fused=fused)
    assert out[0].shape == q.shape and out[1].shape == k.shape and out[0].dtype == dtype
    qd, kd = _ref_leaf(q), _ref_leaf(k_full)
    kd_view = kd[:, :, :, 1] if strided_k else kd
    ref = (ref_rotary(qd, cos, sin, rotary_dim, interleaved), ref_rotary(kd_view, cos, sin, rotary_dim, interleaved))
    compare(out, ref, [q, k_full], [qd, kd], dtype, f"rotary {B, L, Hq, Hk, D, rotary_dim, interleaved, dtype}")


def norm_case(fused: Optional[bool], shape: Sequence[int], rms: bool, with_bias: bool, with_residual: bool,
              dtype: torch.dtype, weight_dtype: torch.dtype = torch.float32, use_sum_output: bool = True,
              device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(sum(shape) + 7 * rms + 3 * with_residual)
    N = shape[-1]
    x = _leaf(torch.randn(*shape, generator=g) * 2 + 0.5, dtype, device)
    res = _leaf(torch.randn(*shape, generator=g), dtype, device) if with_residual else None
    w = _leaf(torch.randn(N, generator=g), weight_dtype, device)
    b = _leaf(torch.randn(N, generator=g), weight_dtype, device) if with_bias else None
    eps = 1e-5
    if rms:
        out = kernels.rms_norm(x, w, eps, res, fused=fused)
    else:
        out = kernels.layer_norm(x, w, b, eps, res, fused=fused)
    out = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in (x, res, w, b) if t is not None]
    ref_leaves = [_ref_leaf(t) for t in leaves]
    xd, rest = ref_leaves[0], ref_leaves[1:]
    rd = rest.pop(0) if with_residual else None
    wd = rest.pop(0)
    bd = rest.pop(0) if with_bias else None
    summed = xd + rd if with_residual else xd
    ref = (ref_norm(summed, wd, bd, eps, rms),) + ((summed,) if with_residual else ())
    if with_residual and not use_sum_output:
        out, ref = out[:1], ref[:1]
    assert out[0].dtype == dtype
    compare(out, ref, leaves, ref_leaves, dtype, f"norm {tuple(shape)} rms={rms} bias={with_bias} "
                                                 f"res={with_residual} {dtype}")


def cross_entropy_case(fused: Optional[bool], N: int, V: int, dtype: torch.dtype,
                       block_v: Optional[int] = None, mean_loss: bool = False, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(N * V)
    logits = _leaf(torch.randn(N, V, generator=g) * 3, dtype, device)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[1::3] = -100
    if block_v is not None:
        from megatron.kernels.triton_cross_entropy import cross_entropy
        loss = cross_entropy(logits, targets.to(device), -100, block_v=block_v)
    else:
        loss = kernels.fused_cross_entropy(logits, targets.to(device), fused=fused)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    ld = _ref_leaf(logits)
    ref = ref_cross_entropy(ld, targets, -100)
    what = f"cross_entropy N={N} V={V} {dtype} block_v={block_v}"
    if mean_loss:  # upstream grad arrives as an expanded scalar (stride 0)
        torch.testing.assert_close(loss.double().cpu(), ref, **TOL[dtype])
        (grad,) = torch.autograd.grad(loss.mean(), [logits])
        (ref_grad,) = torch.autograd.grad(ref.mean(), [ld])
        torch.testing.assert_close(grad.double().cpu(), ref_grad, **TOL[dtype], msg=lambda m: f"{what}: {m}")
    else:
        compare([loss], [ref], [logits], [ld], dtype, what)


ROTARY_CASES: List[dict] = [
    dict(B=2, L=7, Hq=3, Hk=1, D=24, rotary_dim=12, interleaved=False, dtype=torch.float32, batch_cos=False,
         strided_k=False),
    dict(B=2, L=7, Hq=3, Hk=1, D=24, rotary_dim=12, interleaved=True, dtype=torch.float32, batch_cos=True,
         strided_k=True),
    dict(B=1, L=5, Hq=2, Hk=2, D=16, rotary_dim=16, interleaved=False, dtype=torch.float32, batch_cos=False,
         strided_k=True),
    dict(B=2, L=3, Hq=4, Hk=2, D=20, rotary_dim=10, interleaved=True, dtype=torch.bfloat16, batch_cos=True,
         strided_k=False),
]
NORM_CASES: List[dict] = [
    dict(shape=(2, 3, 33), rms=False, with_bias=True, with_residual=False, dtype=torch.float32),
    dict(shape=(5, 33), rms=False, with_bias=False, with_residual=True, dtype=torch.float32),
    dict(shape=(7, 33), rms=True, with_bias=False, with_residual=False, dtype=torch.float32),
    dict(shape=(2, 3, 33), rms=True, with_bias=False, with_residual=True, dtype=torch.float32),
    dict(shape=(6, 40), rms=False, with_bias=True, with_residual=True, dtype=torch.bfloat16),
    dict(shape=(4, 17), rms=True, with_bias=False, with_residual=True, dtype=torch.float32,
         use_sum_output=False),
]
CE_CASES: List[dict] = [
    dict(N=6, V=37, dtype=torch.float32),
    dict(N=5, V=37, dtype=torch.float32, block_v=8, mean_loss=True),
    dict(N=4, V=50, dtype=torch.bfloat16, block_v=16),
]


# ---------------------------------------------------------------------------------------------
# In process: eager fallback vs the references, dispatch, lazy import.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: f"D{c['D']}r{c['rotary_dim']}il{int(c['interleaved'])}")
def test_eager_rotary_matches_fp64(case):
    rotary_case(False, **case)
    rotary_case(None, **case)  # auto on CPU is eager


@pytest.mark.parametrize("case", NORM_CASES,
                         ids=lambda c: f"{c['shape']}rms{int(c['rms'])}res{int(c['with_residual'])}")
def test_eager_norm_matches_fp64(case):
    norm_case(False, **case)


@pytest.mark.parametrize("case", [c for c in CE_CASES if "block_v" not in c], ids=str)
def test_eager_cross_entropy_matches_fp64(case):
    cross_entropy_case(False, **case)


def fake_tensor(cuda: bool, columns: int = 16) -> torch.Tensor:
    return types.SimpleNamespace(is_cuda=cuda, device=torch.device("cuda" if cuda else "cpu"), shape=(2, columns))


def test_dispatch_decisions(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    cuda, cpu = fake_tensor(True), fake_tensor(False)
    assert dispatch.use_fused(cuda, None, "op") and dispatch.use_fused(cuda, True, "op")
    assert not dispatch.use_fused(cuda, False, "op")
    assert not dispatch.use_fused(cpu, None, "op") and not dispatch.use_fused(cpu, False, "op")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_fused(cpu, True, "op")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_fused(cpu, True, "op")
    assert not dispatch.use_fused(cpu, None, "op")  # the interpreter is only used when asked for
    # Wide norm rows go eager in auto mode, and to the kernel (which refuses them) when forced.
    wide = fake_tensor(True, dispatch.NORM_MAX_FUSED_COLUMNS + 1)
    assert not dispatch.use_fused_norm(wide, None, "op") and dispatch.use_fused_norm(wide, True, "op")
    assert dispatch.use_fused_norm(fake_tensor(True, dispatch.NORM_MAX_FUSED_COLUMNS), None, "op")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert not dispatch.use_fused(cuda, None, "op")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        dispatch.use_fused(cuda, True, "op")


def test_fused_true_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="fused=True"):
        kernels.rms_norm(x, torch.ones(8), 1e-5, fused=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        kernels.apply_rotary_qk(x.view(1, 2, 1, 8), x.view(1, 2, 1, 8), torch.ones(1, 2, 2), torch.zeros(1, 2, 2),
                                4, fused=True)


def run_python(code_or_args: List[str], env: Dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env)


def test_cpu_import_and_eager_never_import_triton():
    code = (
        "import sys, torch\n"
        "import megatron.kernels as K\n"
        "x = torch.randn(2, 3, 8, requires_grad=True); w = torch.ones(8, requires_grad=True)\n"
        "y, s = K.layer_norm(x, w, None, 1e-5, x, fused=None); K.rms_norm(x, w, 1e-5, fused=False)\n"
        "q = torch.randn(1, 3, 2, 8); c = torch.ones(1, 3, 2)\n"
        "K.apply_rotary_qk(q, q, c, c, 4); K.fused_cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, -100]))\n"
        "(y.sum() + s.sum()).backward()\n"
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
        "print('ok')\n"
    )
    proc = run_python(["-c", code], env={})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (subprocess), and compiled for sm_90 without a GPU.
# ---------------------------------------------------------------------------------------------

def interpreter_checks() -> Dict[str, str]:
    """Runs in the TRITON_INTERPRET=1 subprocess: every case through the real kernels."""
    from megatron.kernels.triton_cross_entropy import FusedCrossEntropy
    from megatron.kernels.triton_norm import FusedNorm
    from megatron.kernels.triton_rope import RotaryQK

    results: Dict[str, str] = {}

    def record(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results[name] = "ok"
        except Exception as exc:  # reported back to pytest as text
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]

    for i, case in enumerate(ROTARY_CASES):
        record(f"rotary{i}", lambda case=case: rotary_case(True, **case))
    for i, case in enumerate(NORM_CASES):
        record(f"norm{i}", lambda case=case: norm_case(True, **case))
    for i, case in enumerate(CE_CASES):
        record(f"cross_entropy{i}", lambda case=case: cross_entropy_case(True, **case))

    def paths() -> None:
        x = torch.randn(3, 8, requires_grad=True)
        w = torch.ones(8, requires_grad=True)
        q = torch.randn(1, 3, 2, 8, requires_grad=True)
        c = torch.ones(1, 3, 2)
        want = {True: ("RotaryQK", "FusedNorm", "FusedCrossEntropy"), None: ("", "", "")}
        for fused, names in want.items():
            got = (kernels.apply_rotary_qk(q, q, c, c, 4, fused=fused)[0].grad_fn,
                   kernels.rms_norm(x, w, 1e-5, fused=fused).grad_fn,
                   kernels.fused_cross_entropy(x, torch.tensor([0, 1, 2]), fused=fused).grad_fn)
            for fn, name in zip(got, names):
                is_ours = any(n in type(fn).__name__ for n in ("RotaryQK", "FusedNorm", "FusedCrossEntropy"))
                assert (name in type(fn).__name__) if name else not is_ours, (fused, type(fn).__name__)
        assert all(cls is not None for cls in (RotaryQK, FusedNorm, FusedCrossEntropy))

    record("dispatch_paths", paths)
    record("model_integration", model_fused_equals_eager)
    return results


def model_fused_equals_eager() -> None:
    """A tiny GPT with fused_rope / fused_layernorm on gives the eager model's loss and grads."""
    from megatron.config import config_from_tree
    from megatron.model import build_model

    families = (dict(norm="layernorm", rotary_pct=0.25, gpt_j_residual=True),
                dict(norm="rmsnorm", rotary_pct=1.0, num_kv_heads=2, rotary_interleaved=True))
    tokens = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    for family in families:
        runs = []
        for fused in (False, True):
            tree = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16, fused_rope=fused,
                        fused_layernorm=fused,
                        attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4}},
                        **family)
            torch.manual_seed(0)
            model = build_model(config_from_tree(tree), 64, [5, 6], eod_id=0)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            runs.append((loss.detach(), [p.grad for p in model.parameters()]))
        (loss_e, grads_e), (loss_f, grads_f) = runs
        torch.testing.assert_close(loss_f, loss_e, atol=1e-6, rtol=1e-6)
        for g_f, g_e in zip(grads_f, grads_e):
            torch.testing.assert_close(g_f, g_e, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def interpreter_results() -> Dict[str, str]:
    proc = run_python([str(Path(__file__).resolve()), "--interpreter-checks"], env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["rotary", "norm", "cross_entropy", "dispatch_paths", "model_integration"])
def test_triton_kernel_in_interpreter_matches_fp64(interpreter_results, kernel):
    mine = {k: v for k, v in interpreter_results.items() if k.startswith(kernel)}
    assert mine, interpreter_results
    failures = {k: v for k, v in mine.items() if v != "ok"}
    assert not failures, failures


# --- on a GPU (skipped without one): every case above through the compiled kernels, plus model-sized rows ----

CUDA_CASES: Dict[str, List[dict]] = {
    "rotary": ROTARY_CASES + [dict(B=2, L=1024, Hq=12, Hk=12, D=64, rotary_dim=16, interleaved=False,
                                   dtype=torch.bfloat16, batch_cos=False, strided_k=True)],
    "norm": NORM_CASES + [dict(shape=(2048, 4096), rms=True, with_bias=False, with_residual=True,
                               dtype=torch.bfloat16),
                          dict(shape=(4097, 768), rms=False, with_bias=True, with_residual=False,
                               dtype=torch.float32)],
    "cross_entropy": CE_CASES + [dict(N=512, V=50304, dtype=torch.bfloat16)],
}
CASE_FUNCTIONS = {"rotary": rotary_case, "norm": norm_case, "cross_entropy": cross_entropy_case}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", sorted(CUDA_CASES))
def test_triton_kernels_on_cuda_match_fp64(kernel):
    for case in CUDA_CASES[kernel]:
        CASE_FUNCTIONS[kernel](True, **case, device="cuda")


def test_triton_kernels_compile_for_sm90():
    """Lowers every kernel variant to an sm_90 cubin with the bundled ptxas (no GPU needed)."""
    pytest.importorskip("triton")
    proc = run_python(["-m", "megatron.kernels.aot_check"], env={})
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "regs=" in line]
    assert len(lines) >= 40, proc.stdout
    for line in lines:  # rotary and cross-entropy stream small tiles: they must never spill
        if line.startswith(("_rotary", "_ce_")):
            assert line.endswith("spill=0"), line


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    print(json.dumps(interpreter_checks()))

"""Attention and fused kernels at their edges: the smallest window, float64, offsets past 2^31.

* ``n_local`` counts the query itself, so 1 is the smallest window; 0 is refused by the rule object
  (no kernel can be handed it), by config validation and by ``enable_sepllm``, which all accept
  exactly the same settings. The compact path at window 1 with the smallest blocks matches the
  reference.
* The compact CPU path in float64 matches the fp64 reference to float64 accuracy, forward and
  backward (also through context parallelism and ALiBi), and passes ``gradcheck``.
* The Triton kernels (Sep-Attention, RoPE) address rows whose element offsets exceed 2^31: run by
  Triton's interpreter on strided views into one sparse buffer (see ``far_views``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from test_sep_attention import (  # noqa: E402
    BF16_RTOL,
    make_inputs,
    random_documents,
    random_separators,
    reference_fp64,
    rel_err,
    run_with_grads,
)

from megatron.attention.compact import compact_attention  # noqa: E402
from megatron.attention.reference import reference_attention  # noqa: E402
from megatron.attention.sepllm_rule import SepRule, resolve_layer_rules  # noqa: E402

FP64_RTOL = 1e-12


# --- the smallest window: one rule everywhere ---------------------------------------------------

def rule_accepts(n_init: int, n_local: int, interval: int) -> bool:
    try:
        SepRule("sepllm", n_init, n_local, interval)
        return True
    except ValueError as err:
        assert "\n" not in str(err) and "Sep-Attention rule" in str(err)
        return False


def config_accepts(n_init: int, n_local: int, interval: int) -> bool:
    from megatron.config import config_from_tree
    from megatron.errors import ConfigError

    try:
        config_from_tree({"attention": {"sepllm": {"n_init": n_init, "n_local": n_local, "interval": interval}}},
                         log=lambda m: None)
        return True
    except ConfigError:
        return False


def hf_settings_accept(n_init: int, n_local: int, interval: int) -> bool:
    from megatron.hf_remote.sepllm_attach import SepLLMConfigError, SepLLMSettings

    try:
        SepLLMSettings.from_dict({"n_init": n_init, "n_local": n_local, "interval": interval})
        return True
    except SepLLMConfigError:
        return False


@pytest.mark.parametrize("n_init,n_local,interval", [(n_init, n_local, interval) for n_init in (-1, 0, 3)
                                                     for n_local in (-1, 0, 1, 2) for interval in (0, 1, 5)])
def test_rule_config_and_hf_settings_accept_the_same_windows(n_init, n_local, interval):
    want = n_init >= 0 and n_local >= 1 and interval >= 1
    assert (rule_accepts(n_init, n_local, interval), config_accepts(n_init, n_local, interval),
            hf_settings_accept(n_init, n_local, interval)) == (want, want, want)


def test_window_zero_is_one_clear_line_naming_where():
    from megatron.config import config_from_tree
    from megatron.errors import ConfigError
    from megatron.hf_remote.sepllm_attach import SepLLMConfigError, SepLLMSettings

    with pytest.raises(ValueError, match=r"n_local >= 1 \(the local window counts the query itself\).*n_local=0"):
        SepRule("sepllm", 3, 0)
    with pytest.raises(ValueError, match="n_local=0"):  # a per-layer window too
        resolve_layer_rules(4, "sepllm", 3, 64, 5, False, layer_n_local={2: 0})
    with pytest.raises(ConfigError, match="attention.sepllm.layer_n_local gives layer 2 window 0; expected "
                                          "n_local >= 1") as err:
        config_from_tree({"num_layers": 4, "attention": {"sepllm": {"layer_n_local": {2: 0}}}}, log=lambda m: None)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"attention.sepllm.n_local = 0; expected n_local >= 1"):
        config_from_tree({"attention": {"sepllm": {"n_local": 0}}}, log=lambda m: None)
    with pytest.raises(SepLLMConfigError, match=r"n_local=0.*\(layer_n_local\[1\]\)"):
        SepLLMSettings.from_dict({"n_local": 8, "layer_n_local": {"1": 0}})


@pytest.mark.parametrize("blocks", [(1, 1), (2, 1), (3, 3), (4, 2)])
@pytest.mark.parametrize("docs", [False, True])
def test_compact_window_one_with_the_smallest_blocks_matches_reference(blocks, docs):
    B, Hq, Hkv, L, D = 2, 4, 2, 23, 4
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, D, seed=3, dtype=torch.float64)
    is_sep = random_separators(B, L, [0.0, 0.3])
    doc_ids = random_documents(B, L, 6) if docs else None
    for n_init in (0, 2):
        rule = SepRule("sepllm", n_init, 1, separate_documents=docs)
        got = run_with_grads(lambda a, b, c: compact_attention(a, b, c, is_sep, rule, doc_ids, prefix_block=blocks[0],
                                                               near_block=blocks[1]), q, k, v, grad)
        want = reference_fp64(q, k, v, grad, is_sep, rule, doc_ids)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert rel_err(a, b) <= FP64_RTOL, f"n_init {n_init} {name}: {rel_err(a, b):.1e}"


# --- float64 through the compact path -----------------------------------------------------------

FP64_CASES = {
    # name: (B, Hq, Hkv, L, D, density, n_init, n_local, docs mean length, (prefix_block, near_block))
    "typical": (2, 4, 4, 150, 16, 0.12, 3, 16, None, (64, 16)),
    "gqa_documents": (2, 4, 2, 130, 8, [0.1, 0.3], 3, 12, 25, (32, 8)),
    "default_blocks": (1, 2, 1, 300, 8, 0.1, 3, 64, None, (None, None)),
}


@pytest.mark.parametrize("case", sorted(FP64_CASES))
def test_compact_float64_matches_fp64_reference(case):
    B, Hq, Hkv, L, D, density, n_init, n_local, doc_len, blocks = FP64_CASES[case]
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, D, dtype=torch.float64)
    is_sep = random_separators(B, L, density)
    docs = random_documents(B, L, doc_len) if doc_len else None
    rule = SepRule("sepllm", n_init, n_local, separate_documents=docs is not None)
    got = run_with_grads(lambda a, b, c: compact_attention(a, b, c, is_sep, rule, docs, prefix_block=blocks[0],
                                                           near_block=blocks[1]), q, k, v, grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule, docs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float64
        assert rel_err(a, b) <= FP64_RTOL, f"{name}: {rel_err(a, b):.1e}"


def test_compact_float64_with_alibi_matches_fp64_reference():
    from megatron.attention.alibi import AlibiBias, alibi_slopes

    B, H, L = 2, 4, 90
    q, k, v, grad = make_inputs(B, H, H, L, 8, dtype=torch.float64)
    is_sep = random_separators(B, L, 0.15)
    rule = SepRule("sepllm", 2, 8)
    bias = AlibiBias(torch.tensor(alibi_slopes(H)))
    got = run_with_grads(lambda a, b, c: compact_attention(a, b, c, is_sep, rule, prefix_block=32, near_block=8,
                                                           bias=bias), q, k, v, grad)
    want = run_with_grads(lambda a, b, c: reference_attention(a, b, c, is_sep, rule, bias=bias), q, k, v, grad)
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= FP64_RTOL


def test_context_parallel_float64_matches_fp64_reference():
    """The compact kernel at a query offset, as every context-parallel rank runs it."""
    from test_context_parallel_math import simulate_sep

    B, Hq, Hkv, L = 2, 4, 2, 96
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, 8, dtype=torch.float64)
    is_sep = random_separators(B, L, 0.15)
    rule = SepRule("sepllm", 3, 8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = simulate_sep(*leaves, is_sep, rule, None, 4, "compact")
    out.backward(grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], want):
        assert rel_err(a, b) <= FP64_RTOL, f"{name}: {rel_err(a, b):.1e}"


def test_ring_blocks_float64_merge_in_float64():
    """Full-attention blocks merged through their log-sum-exps (ring attention's step) keep fp64."""
    from megatron.attention.blockwise import blocks_backward, blocks_forward, placed
    from megatron.attention.dispatch import dense_causal_attention

    B, H, L = 1, 2, 32
    q, k, v, grad = make_inputs(B, H, H, L, 8, dtype=torch.float64)
    segs = placed([(0, L)])
    halves = [placed([(0, 16)]), placed([(16, L)])]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for k_segs, (a, b) in zip(halves, ((0, 16), (16, L))):
        blocks_forward(q, k[:, :, a:b], v[:, :, a:b], segs, k_segs, None, 8 ** -0.5, out, lse)
    want = dense_causal_attention(q, k, v, SepRule("full"))
    assert rel_err(out, want) <= FP64_RTOL
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for k_segs, (a, b) in zip(halves, ((0, 16), (16, L))):
        blocks_backward(grad, q, k[:, :, a:b], v[:, :, a:b], out, lse, segs, k_segs, None, 8 ** -0.5,
                        dq, dk[:, :, a:b], dv[:, :, a:b])
    want_grads = run_with_grads(lambda a, b, c: dense_causal_attention(a, b, c, SepRule("full")), q, k, v, grad)[1:]
    assert max(rel_err(x, y) for x, y in zip((dq, dk, dv), want_grads)) <= FP64_RTOL


@pytest.mark.parametrize("docs", [False, True])
def test_compact_float64_passes_gradcheck(docs):
    B, Hq, Hkv, L, D = 1, 2, 1, 13, 3
    q, k, v, _ = make_inputs(B, Hq, Hkv, L, D, seed=4, dtype=torch.float64)
    is_sep = random_separators(B, L, 0.3)
    doc_ids = random_documents(B, L, 5) if docs else None
    rule = SepRule("sepllm", 1, 3, separate_documents=docs)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: compact_attention(a, b, c, is_sep, rule, doc_ids, prefix_block=4, near_block=2),
        inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# --- Triton offsets past 2^31 (interpreter) -----------------------------------------------------

PAST_INT32 = 1 << 31


def far_views(shapes: List[tuple], dtype: torch.dtype, L: int, overflow_rows: int) -> List[torch.Tensor]:
    """Empty [B, H, L, D] views whose row stride puts the last ``overflow_rows`` rows past element
    2^31, all interleaved in one buffer: row r of view i sits at ``pad + r * stride + i * slot``.

    The buffer spans ~2^32 elements of address space, but only the rows ever written or read are
    backed by memory (fresh pages stay unmapped until touched). ``pad`` = 2^31 keeps an int32
    offset that wrapped (the bug under test) inside the buffer: it reads zeros and writes into the
    padding instead of crashing, so the check fails cleanly."""
    slot = max(h * d for _, h, _, d in shapes)
    stride = -(-PAST_INT32 // (L - overflow_rows))  # rows >= L - overflow_rows pass 2^31
    assert stride >= slot * len(shapes)
    storage = torch.empty(PAST_INT32 + (L - 1) * stride + slot * len(shapes), dtype=dtype).untyped_storage()
    views = []
    for i, (B, H, n, D) in enumerate(shapes):
        assert B == 1 and n == L
        views.append(aliasing(storage, dtype, (B, H, L, D), (1, D, stride, 1), PAST_INT32 + i * slot))
    return views


def aliasing(storage, dtype: torch.dtype, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
    """A tensor on ``storage`` that autograd does not track as a view of anything (each has its own
    version counter), as the kernels' own outputs are."""
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)


def sep_attention_past_int32(D: int) -> str:
    """Forward and backward of the Sep-Attention kernels with q, k, v, dO and every output (out,
    dq, dk, dv) in far views: row offsets up to ~2^31 + 2^30. Head dim 256 takes the dK/dV kernels'
    other way of addressing (see ``triton_sep_kernels``)."""
    from megatron.attention import triton_sep

    B, Hq, Hkv, L = 1, 2, 1, 40
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, D, dtype=torch.float16)
    shapes = [q.shape, k.shape, v.shape, q.shape, q.shape, q.shape, k.shape, v.shape]
    qv, kv, vv, gv, *outputs = far_views([tuple(s) for s in shapes], torch.float16, L, overflow_rows=12)
    for view, value in zip((qv, kv, vv, gv), (q, k, v, grad)):
        view.copy_(value)
    handed_out = []

    def far_output(x: torch.Tensor) -> torch.Tensor:  # the kernels' output buffers, in order of allocation
        view = outputs[len(handed_out)]
        assert view.shape == x.shape
        handed_out.append(view)
        return view

    is_sep = random_separators(B, L, 0.15)
    docs = random_documents(B, L, 15)
    rule = SepRule("sepllm", 2, 6, separate_documents=True)
    real_alloc = triton_sep._like_model_layout
    triton_sep._like_model_layout = far_output
    try:
        leaves = [t.requires_grad_() for t in (qv, kv, vv)]
        out = triton_sep.triton_sep_attention(*leaves, is_sep, rule, docs, blocks=(16, 16))
        kernel_inputs = out.grad_fn.saved_tensors[:3]  # q, k, v as the kernels got them: not copies
        assert [x.data_ptr() for x in kernel_inputs] == [x.data_ptr() for x in leaves]
        dq, dk, dv = torch.autograd.grad(out, leaves, gv)
    finally:
        triton_sep._like_model_layout = real_alloc
    assert len(handed_out) == 4 and handed_out[0] is out  # out, then dq, dk, dv: all far
    want = reference_fp64(q, k, v, grad, is_sep, rule, docs)
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want)}
    assert max(errors.values()) <= BF16_RTOL, errors
    return ", ".join(f"{n} {e:.0e}" for n, e in errors.items())


def rope_past_int32() -> str:
    """RoPE on q whose heads are 2^30 elements apart (a [B, H, L, D] tensor viewed as [B, L, H, D]
    has head stride L x D): head 2 starts past element 2^31."""
    from megatron.kernels import eager
    from megatron.kernels.triton_rope import rotary_qk

    D, H, rot = 16, 3, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, H, D, generator=g).half(), torch.randn(1, 1, 2, D, generator=g).half()
    cos, sin = torch.randn(1, 1, rot // 2, generator=g), torch.randn(1, 1, rot // 2, generator=g)
    stride = (1 << 30) + D
    storage = torch.empty(PAST_INT32 + (H - 1) * stride + D, dtype=torch.float16).untyped_storage()
    qv = aliasing(storage, torch.float16, tuple(q.shape), (1, 1, stride, 1), PAST_INT32)
    qv.copy_(q)
    got = rotary_qk(qv, k, cos, sin, rot)
    want = eager.apply_rotary_qk(q, k, cos, sin, rot)
    errors = [float((a.float() - b.float()).abs().max()) for a, b in zip(got, want)]
    assert max(errors) == 0.0, errors
    return f"q {errors[0]}, k {errors[1]}"


def interpreter_checks() -> Dict[str, str]:
    results = {}
    for name, fn in (("sep_attention_d16", lambda: sep_attention_past_int32(16)),
                     ("sep_attention_d256", lambda: sep_attention_past_int32(256)), ("rope", rope_past_int32)):
        try:
            results[name] = "ok: " + fn()
        except Exception as exc:  # reported back to pytest as text
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    return results


@pytest.fixture(scope="module")
def past_int32_results() -> Dict[str, str]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_launcher_copies_views_whose_tile_offsets_would_pass_2_31():
    """The kernels address a tile's first row in int64 and the rows inside it in int32."""
    pytest.importorskip("triton")
    from megatron.attention.triton_sep import Launch, _kernel_layout, fits_int32_tile

    tile_rows = Launch(64, 1.0).tile_rows(128, torch.bfloat16)  # the shipped tiles
    assert tile_rows == 128 and fits_int32_tile(64 * 128, tile_rows)  # a model layout: heads x head dim
    storage = torch.empty(3 * (1 << 25) + 8, dtype=torch.float16).untyped_storage()
    view = aliasing(storage, torch.float16, (1, 1, 4, 8), (1, 1, 1 << 25, 1), 0)
    view.copy_(torch.randn(1, 1, 4, 8))
    assert _kernel_layout(view, 16) is view  # 15 rows x 2^25 < 2^31
    copied = _kernel_layout(view, tile_rows)  # 127 rows x 2^25 > 2^31
    assert copied.stride(2) == 8 and torch.equal(copied, view)


@pytest.mark.parametrize("kernel", ["sep_attention_d16", "sep_attention_d256", "rope"])
def test_triton_kernels_address_offsets_past_2_31(past_int32_results, kernel):
    assert past_int32_results.get(kernel, "missing").startswith("ok"), past_int32_results


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    print(json.dumps(interpreter_checks()))

"""Fast Sep-Attention paths against the dense-mask reference (forward and q/k/v gradients)."""
from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

from megatron.attention import attend, kv_kept_fraction, kv_kept_per_query, separator_flags
from megatron.attention.compact import build_plan, compact_attention
from megatron.attention.dispatch import dense_causal_attention
from megatron.attention.reference import reference_attention
from megatron.attention.sepllm_rule import SepRule, dense_mask

FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|; absolute error where b is identically ~0 (e.g. dq of a lone token)."""
    scale = b.double().abs().max()
    return float((a.double() - b.double()).abs().max() / (scale if scale > 1e-6 else 1.0))


def make_inputs(B: int, Hq: int, Hkv: int, L: int, D: int, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    grad = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    return q, k, v, grad


def random_separators(B: int, L: int, density, seed: int = 1) -> torch.Tensor:
    """Per-row densities (a float or one per row) so rows get different separator counts."""
    g = torch.Generator().manual_seed(seed)
    dens = torch.as_tensor(density, dtype=torch.float32).expand(B)[:, None]
    return torch.rand(B, L, generator=g) < dens


def random_documents(B: int, L: int, mean_len: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum((torch.rand(B, L, generator=g) < 1.0 / mean_len).long(), dim=1)


def run_with_grads(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def reference_fp64(q, k, v, grad, is_sep, rule, doc_ids=None):
    return run_with_grads(lambda a, b, c: reference_attention(a, b, c, is_sep, rule, doc_ids),
                          q.double(), k.double(), v.double(), grad.double())


def check_compact(q, k, v, grad, is_sep, rule, doc_ids=None, blocks=(64, 16),
                  rtol: float = FP32_RTOL):
    """``blocks`` = (prefix_block, near_block), small so short tests cross many blocks."""
    got = run_with_grads(lambda a, b, c: compact_attention(a, b, c, is_sep, rule, doc_ids, prefix_block=blocks[0],
                                                           near_block=blocks[1]),
                         q, k, v, grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule, doc_ids)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype
        assert rel_err(a, b) <= rtol, f"{name}: rel err {rel_err(a, b):.2e}"


CASES = {
    # name: (B, Hq, Hkv, L, D, density, n_init, n_local, docs_mean_len)
    "typical": (2, 4, 4, 200, 16, 0.12, 3, 16, None),
    "no_separators": (2, 2, 2, 150, 8, 0.0, 3, 16, None),
    "all_separators": (2, 2, 2, 150, 8, 1.0, 3, 16, None),
    "shorter_than_init_plus_local": (2, 2, 2, 12, 8, 0.2, 4, 16, None),
    "single_token": (1, 2, 2, 1, 8, 0.5, 3, 16, None),
    "rows_differ": (3, 2, 2, 170, 8, [0.0, 0.05, 0.5], 3, 8, None),
    "gqa": (2, 6, 2, 130, 16, 0.12, 3, 16, None),
    "mqa": (1, 4, 1, 97, 8, 0.12, 2, 8, None),
    "documents": (2, 4, 2, 230, 8, 0.12, 3, 16, 40),
    "documents_short": (2, 2, 2, 100, 8, [0.1, 0.3], 3, 24, 7),
    "window_one": (1, 2, 2, 77, 8, 0.2, 0, 1, None),
    "window_longer_than_seq": (1, 2, 2, 50, 8, 0.1, 3, 128, None),
}


@pytest.mark.parametrize("blocks", [(64, 16), (32, 32), (256, 64)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compact_matches_reference(case: str, blocks):
    B, Hq, Hkv, L, D, density, n_init, n_local, doc_len = CASES[case]
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, D)
    is_sep = random_separators(B, L, density)
    docs = random_documents(B, L, doc_len) if doc_len else None
    rule = SepRule("sepllm", n_init, n_local, separate_documents=docs is not None)
    check_compact(q, k, v, grad, is_sep, rule, docs, blocks=blocks)


@pytest.mark.parametrize("mode", ["sepllm", "streamingllm", "fixed_interval", "full"])
def test_compact_all_modes_via_separator_flags(mode: str):
    B, L = 2, 180
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 50, (B, L), generator=g)
    rule = SepRule(mode, n_init=3, n_local=16, interval=5)
    is_sep = separator_flags(tokens, rule, separator_ids=torch.tensor([1, 7, 13, 42]))
    q, k, v, grad = make_inputs(B, 4, 2, L, 8)
    # The compact kernel itself (attend() routes 'full' layers to dense causal attention).
    check_compact(q, k, v, grad, is_sep, rule)
    got = run_with_grads(lambda a, b, c: attend(a, b, c, is_sep, rule, impl="compact"), q, k, v, grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule)
    assert all(rel_err(a, b) <= FP32_RTOL for a, b in zip(got, want))


def test_compact_non_monotonic_document_ids():
    """Document ids that repeat (A B A) fall back to masking by id equality, like the reference."""
    B, L = 1, 90
    docs = torch.cat([torch.zeros(30), torch.ones(30), torch.zeros(30)]).long()[None]
    q, k, v, grad = make_inputs(B, 2, 2, L, 8)
    rule = SepRule("sepllm", 3, 8, separate_documents=True)
    check_compact(q, k, v, grad, random_separators(B, L, 0.15), rule, docs)


def test_compact_bf16():
    q, k, v, grad = make_inputs(2, 4, 2, 160, 16, dtype=torch.bfloat16)
    is_sep = random_separators(2, 160, [0.1, 0.2])
    rule = SepRule("sepllm", 3, 16)
    check_compact(q, k, v, grad, is_sep, rule, rtol=BF16_RTOL)


def test_compact_non_contiguous_inputs_like_the_model():
    """The model passes [B, L, H, D] tensors transposed to [B, H, L, D]."""
    B, L, H, D = 2, 120, 4, 8
    q, k, v, grad = make_inputs(B, H, H, L, D)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    check_compact(q, k, v, grad, random_separators(B, L, 0.12), SepRule("sepllm", 3, 16))


def test_compact_plan_is_block_triangular():
    """Each query block touches only the compact specials it can see, never the whole set."""
    L, w = 1024, 64
    is_sep = random_separators(1, L, 0.12)
    plan = build_plan(is_sep, SepRule("sepllm", 3, w), prefix_block=256, near_block=64)
    special = is_sep[0].clone()
    special[:3] = True

    def seen_by(i: int) -> int:  # compact slots visible to query i are [0, seen_by(i))
        return int(special[:max(0, i - w + 1)].sum())

    for pre, nears in plan.groups:
        assert (pre.lo, pre.hi) == (0, seen_by(pre.start))
        assert [n.start for n in nears] == list(range(pre.start, pre.end, 64))
        for blk in nears:
            covered = sorted(s for a, b in blk.special_ranges for s in range(a, b))
            assert covered == list(range(pre.hi, seen_by(blk.end - 1)))  # only the block's diagonal
            assert blk.local_start == max(0, blk.start - w + 1)
    assert seen_by(L - 1) < plan.special_idx.shape[1]


def test_compact_plan_skips_earlier_documents():
    L = 512
    docs = torch.arange(L)[None] // 128
    is_sep = random_separators(1, L, 0.2)
    plan = build_plan(is_sep, SepRule("sepllm", 3, 16, separate_documents=True), docs,
                      prefix_block=128, near_block=32)
    special = is_sep[0] | (torch.arange(L) % 128 < 3)
    for pre, nears in plan.groups:
        before_doc = int(special[:pre.start].sum())
        # The first query of each block starts a document: it sees no special older than its window.
        assert pre.empty and pre.lo == before_doc
        for blk in nears:
            assert blk.local_start >= pre.start  # the band never reaches into the previous document
            assert all(a >= before_doc for a, _ in blk.special_ranges)


def test_plan_is_reused_for_the_same_flags_and_rebuilt_when_they_change():
    from megatron.attention import compact as compact_mod
    q, k, v, _ = make_inputs(1, 2, 2, 64, 8)
    is_sep = random_separators(1, 64, 0.2)
    rule = SepRule("sepllm", 3, 8)
    compact_attention(q, k, v, is_sep, rule)
    first = compact_mod._PLANS._value
    compact_attention(q, k, v, is_sep, rule)  # the next layer, same flags
    assert compact_mod._PLANS._value is first
    is_sep[0, 10] = ~is_sep[0, 10]  # changed in place: must not reuse
    got = compact_attention(q, k, v, is_sep, rule)
    second = compact_mod._PLANS._value
    assert second is not first
    assert rel_err(got, reference_attention(q, k, v, is_sep, rule)) <= FP32_RTOL
    compact_attention(q, k, v, is_sep.clone(), rule)  # equal values, another tensor: rebuilt
    assert compact_mod._PLANS._value is not second


# --- dispatch ---------------------------------------------------------------------------------

def test_auto_uses_compact_on_cpu_and_full_layers_go_dense(monkeypatch):
    import megatron.attention.compact as compact_mod
    q, k, v, _ = make_inputs(1, 2, 2, 40, 8)
    is_sep = random_separators(1, 40, 0.2)
    calls = []
    real = compact_mod.compact_attention
    monkeypatch.setattr(compact_mod, "compact_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attend(q, k, v, is_sep, SepRule("sepllm", 3, 8), impl="auto")
    assert calls == [1]
    full = attend(q, k, v, is_sep, SepRule("full"), impl="auto")
    assert calls == [1]
    assert rel_err(full, dense_causal_attention(q, k, v, SepRule("full"))) == 0.0


def test_sdpa_is_dense_causal_with_gqa():
    q, k, v, _ = make_inputs(2, 4, 2, 33, 8)
    rule = SepRule("sepllm", 3, 8)
    want = reference_attention(q, k, v, torch.ones(2, 33, dtype=torch.bool), rule)
    assert rel_err(attend(q, k, v, torch.zeros(2, 33, dtype=torch.bool), rule, impl="sdpa"), want) < 1e-6


def test_unknown_and_unavailable_impls_fail_clearly(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 2, 8, 4)
    is_sep = torch.zeros(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention.impl"):
        attend(q, k, v, is_sep, SepRule(), impl="bogus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):  # runs on CPU only in the interpreter
        attend(q, k, v, is_sep, SepRule(), impl="triton")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="flash_attn"):
            attend(q, k, v, is_sep, SepRule(), impl="flash")


# --- KV accounting ----------------------------------------------------------------------------

@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.12, 1.0])
def test_kv_kept_matches_dense_mask_count(density: float, docs: bool):
    B, L = 3, 157
    is_sep = random_separators(B, L, density)
    doc_ids: Optional[torch.Tensor] = random_documents(B, L, 30) if docs else None
    rule = SepRule("sepllm", 3, 16, separate_documents=docs)
    mask = dense_mask(is_sep, rule, doc_ids)
    assert torch.equal(kv_kept_per_query(is_sep, rule, doc_ids), mask.sum(-1))
    full = dense_mask(torch.ones_like(is_sep), rule, doc_ids)
    assert kv_kept_fraction(is_sep, rule, doc_ids) == pytest.approx(float(mask.sum() / full.sum()))

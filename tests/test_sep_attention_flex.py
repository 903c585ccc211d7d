"""FlexAttention over the compact layout: forward vs reference (eager on CPU) and tile structure."""
from __future__ import annotations

import pytest
import torch
from test_sep_attention import (
    CASES,
    FP32_RTOL,
    make_inputs,
    random_documents,
    random_separators,
    rel_err,
    run_with_grads,
)

from megatron.attention import attend, separator_flags
from megatron.attention.compact import special_flags
from megatron.attention.flex import FLEX_BLOCK, build_flex_layout, flex_sep_attention
from megatron.attention.reference import reference_attention
from megatron.attention.sepllm_rule import SepRule, dense_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def case_inputs(case: str):
    B, Hq, Hkv, L, D, density, n_init, n_local, doc_len = CASES[case]
    q, k, v, _ = make_inputs(B, Hq, Hkv, L, D)
    is_sep = random_separators(B, L, density)
    docs = random_documents(B, L, doc_len) if doc_len else None
    return q, k, v, is_sep, SepRule("sepllm", n_init, n_local, separate_documents=docs is not None), docs


@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_forward_matches_reference(case: str):
    q, k, v, is_sep, rule, docs = case_inputs(case)
    with torch.no_grad():
        got = flex_sep_attention(q, k, v, is_sep, rule, docs, compile=False)
        want = reference_attention(q.double(), k.double(), v.double(), is_sep, rule, docs)
    assert rel_err(got, want) <= FP32_RTOL


@pytest.mark.parametrize("mode", ["sepllm", "streamingllm", "fixed_interval", "full"])
def test_flex_forward_all_modes_via_separator_flags(mode: str):
    B, L = 2, 300
    tokens = torch.randint(0, 50, (B, L), generator=torch.Generator().manual_seed(5))
    rule = SepRule(mode, n_init=3, n_local=16, interval=5)
    is_sep = separator_flags(tokens, rule, separator_ids=torch.tensor([1, 7, 13, 42]))
    q, k, v, _ = make_inputs(B, 4, 2, L, 8)
    with torch.no_grad():
        got = flex_sep_attention(q, k, v, is_sep, rule, compile=False)  # the kernel itself, even for 'full'
        want = reference_attention(q.double(), k.double(), v.double(), is_sep, rule)
    assert rel_err(got, want) <= FP32_RTOL


def test_flex_forward_bf16():
    q, k, v, is_sep, rule, docs = case_inputs("documents")
    with torch.no_grad():
        got = flex_sep_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_sep, rule, docs, compile=False)
        want = reference_attention(q.double(), k.double(), v.double(), is_sep, rule, docs)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 2e-2


def test_flex_through_attend():
    q, k, v, is_sep, rule, docs = case_inputs("gqa")
    with torch.no_grad():
        got = attend(q, k, v, is_sep, rule, impl="flex")
        want = attend(q, k, v, is_sep, rule, impl="reference")
    assert rel_err(got, want) <= FP32_RTOL


def expected_compact_mask(is_sep, rule, docs, capacity: int) -> torch.Tensor:
    """[B, L, capacity + L] element mask of the compact layout, derived from the dense rule."""
    B, L = is_sep.shape
    dm = dense_mask(is_sep, rule, docs)
    special = special_flags(is_sep, rule, docs if rule.separate_documents else None)
    q_pos = torch.arange(L)[:, None]
    out = torch.zeros(B, L, capacity + L, dtype=torch.bool)
    for b in range(B):
        idx = special[b].nonzero().flatten()
        out[b, :, :len(idx)] = dm[b][:, idx] & (q_pos - idx[None] >= rule.n_local)
        out[b, :, capacity:] = dm[b] & (q_pos - torch.arange(L)[None] < rule.n_local)
    assert torch.equal(out.sum(-1), dm.sum(-1)), "compact layout must keep every visible key once"
    return out


def tiles(mask: torch.Tensor, n_q: int, n_kv: int) -> torch.Tensor:
    B, L, K = mask.shape
    padded = torch.zeros(B, n_q * FLEX_BLOCK, n_kv * FLEX_BLOCK, dtype=torch.bool)
    padded[:, :L, :K] = mask
    return padded.view(B, n_q, FLEX_BLOCK, n_kv, FLEX_BLOCK).transpose(2, 3)


def kv_tiles_dense(num: torch.Tensor, idx: torch.Tensor, n_kv: int) -> torch.Tensor:
    B, _, n_q = num.shape
    out = torch.zeros(B, n_q, n_kv, dtype=torch.bool)
    for b in range(B):
        for t in range(n_q):
            out[b, t, idx[b, 0, t, :num[b, 0, t]].long()] = True
    return out


@pytest.mark.parametrize("case,L,n_local", [("typical", 700, 64), ("documents", 900, 16),
                                            ("rows_differ", 600, 300), ("no_separators", 400, 128)])
def test_flex_tiles_cover_the_rule_and_full_tiles_are_full(case: str, L: int, n_local: int):
    B, _, _, _, _, density, n_init, _, doc_len = CASES[case]
    is_sep = random_separators(B, L, density)
    docs = random_documents(B, L, doc_len) if doc_len else None
    rule = SepRule("sepllm", n_init, n_local, separate_documents=docs is not None)
    layout = build_flex_layout(is_sep, rule, docs)
    bm = layout.block_mask
    want = expected_compact_mask(is_sep, rule, docs, layout.capacity)
    n_q, n_kv = bm.kv_indices.shape[-2:]
    t = tiles(want, n_q, n_kv)
    partial = kv_tiles_dense(bm.kv_num_blocks, bm.kv_indices, n_kv)
    full = kv_tiles_dense(bm.full_kv_num_blocks, bm.full_kv_indices, n_kv)
    live = t.flatten(-2).any(-1)
    assert not (live & ~(partial | full)).any(), "a visible key lies in a skipped tile"
    assert not (partial & full).any()
    # Full tiles skip mask_mod: every in-range element must be visible.
    in_range = tiles(torch.ones_like(want), n_q, n_kv)
    assert torch.equal((t | ~in_range)[full].flatten(-2).all(-1), torch.ones(int(full.sum()), dtype=torch.bool))
    # mask_mod on every pair reproduces the rule.
    b, q, kv = torch.meshgrid(torch.arange(B), torch.arange(L), torch.arange(want.shape[-1]), indexing="ij")
    assert torch.equal(bm.mask_mod(b, torch.zeros_like(b), q, kv), want)


def test_flex_layout_skips_most_tiles_at_realistic_length():
    L = 16384
    is_sep = random_separators(1, L, 0.12)
    layout = build_flex_layout(is_sep, SepRule("sepllm", 3, 128))
    bm = layout.block_mask
    live = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    n_q = L // FLEX_BLOCK
    causal_tiles = n_q * (n_q + 1) // 2
    assert live < 0.2 * causal_tiles
    assert int(bm.kv_num_blocks.sum()) < 0.5 * live  # most live tiles need no mask_mod


@pytest.mark.slow
@pytest.mark.parametrize("case", ["documents", "gqa", "rows_differ"])
def test_flex_compiled_cpu_forward_uses_tile_sparsity(case: str):
    """Compiled FlexAttention honours the tile lists (eager ignores them), so this checks them end to end."""
    q, k, v, is_sep, rule, docs = case_inputs(case)
    with torch.no_grad():
        got = flex_sep_attention(q, k, v, is_sep, rule, docs, compile=True)
        want = reference_attention(q.double(), k.double(), v.double(), is_sep, rule, docs)
    assert rel_err(got, want) <= FP32_RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention fwd + bwd)")
@pytest.mark.parametrize("case", ["typical", "documents", "gqa", "rows_differ", "all_separators"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_cuda_forward_and_grads_match_reference(case: str, dtype: torch.dtype):
    B, Hq, Hkv, _, D, density, n_init, n_local, doc_len = CASES[case]
    L, D = 1000, 64
    q, k, v, grad = (t.cuda() for t in make_inputs(B, Hq, Hkv, L, D, dtype=dtype))
    is_sep = random_separators(B, L, density).cuda()
    docs = random_documents(B, L, doc_len).cuda() if doc_len else None
    rule = SepRule("sepllm", n_init, n_local, separate_documents=docs is not None)
    got = run_with_grads(lambda a, b, c: attend(a, b, c, is_sep, rule, docs, impl="flex"), q, k, v, grad)
    want = run_with_grads(lambda a, b, c: reference_attention(a, b, c, is_sep, rule, docs),
                          q.double(), k.double(), v.double(), grad.double())
    rtol = FP32_RTOL if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= rtol, f"{name}: {rel_err(a, b):.2e}"

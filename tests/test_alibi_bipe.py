"""ALiBi and BiPE (SepLLM's position variants) through every attention impl, against a float64
reference written here from the definitions (slopes, segment positions, bias), not from the code."""
from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch
from test_sep_attention import BF16_RTOL, FP32_RTOL, make_inputs, random_documents, rel_err, run_with_grads

from megatron.attention import attend
from megatron.attention.alibi import AlibiBias, alibi_slopes, local_alibi_slopes
from megatron.attention.sepllm_rule import SepRule, dense_mask
from megatron.model.bipe import bilevel_positions


# ------------------------------------------------------------------ the definitions, written independently
def slopes_by_definition(n: int) -> List[float]:
    """ALiBi paper: heads 1..n of a power of two get 2^(-8 i / n); otherwise the largest power of two
    p < n gets its sequence and the remaining n - p heads take the odd-numbered slopes of 2p heads."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    p = 1 << (n.bit_length() - 1)
    return [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)] + \
        [2.0 ** (-8.0 * i / (2 * p)) for i in range(1, 2 * p + 1, 2)][: n - p]


def bilevel_by_definition(tokens: torch.Tensor, seps: List[int]):
    """Token by token: a separator ends its segment; the next token starts the next one at offset 0."""
    intra, inter = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        segment, offset = 0, 0
        for t in range(tokens.shape[1]):
            intra[b, t], inter[b, t] = offset, segment
            if int(tokens[b, t]) in seps:
                segment, offset = segment + 1, 0
            else:
                offset += 1
    return intra, inter


def alibi_reference_fp64(q, k, v, grad, is_sep, rule, doc_ids=None, segments: Optional[torch.Tensor] = None):
    """Softmax(q k^T / sqrt(D) - slope_h * (pos_i - pos_j), masked by the Sep rule) v, in float64."""
    def attention(q, k, v):
        B, Hq, L, D = q.shape
        group = Hq // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        slopes = torch.tensor(slopes_by_definition(Hq), dtype=torch.float64)
        pos = (torch.arange(L, dtype=torch.float64).expand(B, L) if segments is None else segments.double())
        dist = pos[:, None, :, None] - pos[:, None, None, :]
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D) - slopes[None, :, None, None] * dist
        scores = scores.masked_fill(~dense_mask(is_sep, rule, doc_ids)[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    return run_with_grads(attention, q.double(), k.double(), v.double(), grad.double())


def test_slopes_follow_the_definition_for_any_head_count():
    for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32, 40, 64):
        assert alibi_slopes(n) == pytest.approx(slopes_by_definition(n), rel=1e-12), n
    # 12 heads (Pythia-160M), as SepLLM's training code prints them
    assert alibi_slopes(12) == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
                                              0.70711, 0.35355, 0.17678, 0.088388], rel=1e-4)


@pytest.mark.parametrize("heads,tp", [(8, 2), (12, 4), (6, 3)])
def test_tensor_parallel_ranks_hold_their_heads_slopes(heads: int, tp: int):
    per_rank = [local_alibi_slopes(heads, tp, r) for r in range(tp)]
    assert all(len(s) == heads // tp for s in per_rank)
    assert sum(per_rank, []) == alibi_slopes(heads)


def test_bilevel_positions_follow_the_definition():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 12, (4, 57), generator=g)
    tokens[0, 0] = tokens[0, 1] = tokens[0, -1] = 2  # separator first, twice in a row and last
    tokens[3] = 9  # a row without separators
    seps = [2, 5]
    intra, inter = bilevel_positions(tokens, torch.tensor(seps))
    want_intra, want_inter = bilevel_by_definition(tokens, seps)
    assert torch.equal(intra, want_intra) and torch.equal(inter, want_inter)
    assert torch.equal(intra[3], torch.arange(57)) and not inter[3].any()


# ------------------------------------------------------------------ every impl vs the float64 reference
CASES = {
    # name: (B, Hq, Hkv, L, D, separator density, n_init, n_local, mean document length)
    "typical": (2, 4, 4, 150, 16, 0.12, 3, 16, None),
    "gqa_non_power_of_two_heads": (2, 6, 2, 130, 8, 0.12, 3, 16, None),
    "rows_differ": (3, 2, 2, 120, 8, [0.0, 0.05, 0.5], 3, 8, None),
    "documents": (2, 4, 2, 160, 8, 0.12, 3, 16, 40),
    "single_token": (1, 2, 2, 1, 8, 0.5, 3, 16, None),
    "window_one": (1, 2, 2, 77, 8, 0.2, 0, 1, None),
}
VARIANTS = ("alibi", "alibi_bipe")


def case_inputs(case: str, variant: str, dtype=torch.float32):
    B, Hq, Hkv, L, D, density, n_init, n_local, doc_len = CASES[case]
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, D, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    dens = torch.as_tensor(density, dtype=torch.float32).expand(B)[:, None]
    is_sep = torch.rand(B, L, generator=g) < dens
    docs = random_documents(B, L, doc_len) if doc_len else None
    rule = SepRule("sepllm", n_init, n_local, separate_documents=docs is not None)
    # BiPE's segments end at the separators here (its separator set may differ; positions are inputs).
    segments = (torch.cumsum(is_sep.long(), 1) - is_sep.long()) if variant == "alibi_bipe" else None
    bias = AlibiBias(torch.tensor(local_alibi_slopes(Hq)), segments)
    return q, k, v, grad, is_sep, rule, docs, segments, bias


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_sep_attention_impls_with_alibi_match_fp64_definition(impl: str, case: str, variant: str):
    q, k, v, grad, is_sep, rule, docs, segments, bias = case_inputs(case, variant)
    want = alibi_reference_fp64(q, k, v, grad, is_sep, rule, docs, segments)
    if impl == "compact":  # small blocks, so short sequences cross many prefix and near blocks
        from megatron.attention.compact import compact_attention
        fn = lambda a, b, c: compact_attention(a, b, c, is_sep, rule, docs, prefix_block=32, near_block=16, bias=bias)
    else:
        fn = lambda a, b, c: attend(a, b, c, is_sep, rule, docs, impl=impl, bias=bias)
    got = run_with_grads(fn, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= FP32_RTOL, f"{name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["typical", "gqa_non_power_of_two_heads", "documents", "rows_differ"])
def test_flex_forward_with_alibi_matches_fp64_definition(case: str, variant: str):
    """Eager FlexAttention (CPU: forward only; CUDA compiles the same score_mod, fwd and bwd)."""
    q, k, v, grad, is_sep, rule, docs, segments, bias = case_inputs(case, variant)
    want = alibi_reference_fp64(q, k, v, grad, is_sep, rule, docs, segments)[0]
    got = attend(q, k, v, is_sep, rule, docs, impl="flex", bias=bias)
    assert rel_err(got, want) <= FP32_RTOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ["reference", "compact", "sdpa"])
def test_full_layers_and_sdpa_baseline_with_alibi_are_causal_plus_bias(impl: str, variant: str):
    """Full-attention layers go to dense causal attention in every impl; 'sdpa' is that baseline for
    any rule. Both add the bias to the causal scores."""
    q, k, v, grad, is_sep, _, _, segments, bias = case_inputs("gqa_non_power_of_two_heads", variant)
    rule = SepRule("full", 3, 16) if impl != "sdpa" else SepRule("sepllm", 3, 16)
    want = alibi_reference_fp64(q, k, v, grad, torch.ones_like(is_sep), SepRule("full"), None, segments)
    got = run_with_grads(lambda a, b, c: attend(a, b, c, is_sep, rule, impl=impl, bias=bias), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= FP32_RTOL, f"{name}: rel err {rel_err(a, b):.2e}"


def test_compact_with_alibi_in_bf16():
    q, k, v, grad, is_sep, rule, docs, segments, bias = case_inputs("gqa_non_power_of_two_heads", "alibi",
                                                                    dtype=torch.bfloat16)
    want = alibi_reference_fp64(q, k, v, grad, is_sep, rule, docs, segments)
    got = run_with_grads(lambda a, b, c: attend(a, b, c, is_sep, rule, impl="compact", bias=bias), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) <= BF16_RTOL, name


def test_flash_refuses_segment_level_alibi():
    q, k, v, _, is_sep, rule, _, _, bias = case_inputs("typical", "alibi_bipe")
    with pytest.raises((NotImplementedError, RuntimeError)):
        attend(q, k, v, is_sep, rule, impl="flash", bias=bias)

"""Context-parallel attention math in one process: every cp rank is simulated (its chunk, the pieces
the plans say it receives, its local attention; ring steps for full layers), the chunks are put back
together and compared with the fp64 reference on the whole sequence, forward and q/k/v gradients."""
from __future__ import annotations

import pytest
import torch
from test_sep_attention import make_inputs, random_documents, random_separators, reference_fp64, rel_err

from megatron.attention.blockwise import blocks_backward, blocks_forward, placed
from megatron.attention.context_parallel import (
    build_rank_plans,
    owner_maps,
    segment_attention,
    sequence_segments,
    take_segments,
)
from megatron.attention.dispatch import dense_causal_attention
from megatron.attention.sepllm_rule import SepRule, separator_flags

TOL = 1e-5


def _pieces(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def _scatter_back(chunks, plans, like):
    full = torch.zeros_like(like)
    for out, plan in zip(chunks, plans):
        for a, b, off in placed(plan.segments):
            full[:, :, a:b] = out[:, :, off:off + b - a]
    return full


def simulate_sep(q, k, v, is_sep, rule, docs, cp, impl, balanced=True):
    """Every rank's output, from its chunk and what it receives, put back in sequence order."""
    plans = build_rank_plans(is_sep, rule, docs, cp, balanced=balanced)
    k_chunks = [take_segments(k, p.segments, 2) for p in plans]
    v_chunks = [take_segments(v, p.segments, 2) for p in plans]
    outs = []
    for p in plans:
        recv_k = [_pieces(k_chunks[s], plans[s].sends[p.rank]) for s in p.recvs]
        recv_v = [_pieces(v_chunks[s], plans[s].sends[p.rank]) for s in p.recvs]
        k_pool = torch.cat([k_chunks[p.rank]] + recv_k, dim=2)
        v_pool = torch.cat([v_chunks[p.rank]] + recv_v, dim=2)
        outs.append(segment_attention(take_segments(q, p.segments, 2), k_pool, v_pool, p, rule, is_sep,
                                      docs if rule.separate_documents else None, impl))
    return _scatter_back(outs, plans, q), plans


def check_sep(q, k, v, grad, is_sep, rule, docs, cp, impl, balanced=True):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, plans = simulate_sep(*leaves, is_sep, rule, docs, cp, impl, balanced)
    out.backward(grad)
    want = reference_fp64(q, k, v, grad, is_sep, rule, docs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], want):
        assert rel_err(a, b) <= TOL, f"{name}: rel err {rel_err(a, b):.2e}"
    return plans


CASES = {
    # name: (mode, B, Hq, Hkv, L, n_init, n_local, density, doc mean length)
    "sepllm": ("sepllm", 2, 4, 2, 96, 3, 8, 0.15, None),
    "rows_differ": ("sepllm", 3, 2, 2, 96, 2, 6, [0.0, 0.1, 0.5], None),
    "streamingllm": ("streamingllm", 2, 2, 2, 64, 3, 8, 0.0, None),
    "fixed_interval": ("fixed_interval", 2, 4, 2, 80, 2, 6, None, None),
    "documents": ("sepllm", 2, 4, 2, 96, 3, 8, 0.15, 12),
    "window_spans_ranks": ("sepllm", 2, 2, 1, 64, 2, 24, 0.15, None),  # halo longer than a segment
    "window_one": ("sepllm", 1, 2, 2, 48, 0, 1, 0.2, None),
    "init_beyond_first_segment": ("sepllm", 1, 2, 2, 32, 9, 3, 0.1, None),
}


@pytest.mark.parametrize("impl", ["compact", "reference"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_separator_exchange_matches_reference(case, cp, impl):
    mode, B, Hq, Hkv, L, n_init, n_local, density, doc_len = CASES[case]
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, 8)
    rule = SepRule(mode, n_init, n_local, interval=5, separate_documents=doc_len is not None)
    if mode == "sepllm":
        is_sep = random_separators(B, L, density)
    else:
        is_sep = separator_flags(torch.zeros(B, L, dtype=torch.long), rule)  # global positions
    docs = random_documents(B, L, doc_len) if doc_len else None
    check_sep(q, k, v, grad, is_sep, rule, docs, cp, impl)


def test_contiguous_split_matches_reference_too():
    q, k, v, grad = make_inputs(2, 4, 2, 96, 8)
    check_sep(q, k, v, grad, random_separators(2, 96, 0.15), SepRule("sepllm", 3, 8), None, 3, "compact",
              balanced=False)


def test_pieces_carry_specials_and_halo_only():
    """What a rank receives: the earlier specials below its halo and the halo, nothing else; bytes
    scale with the separator count."""
    L, cp, w = 128, 2, 8
    is_sep = random_separators(1, L, 0.1)
    rule = SepRule("sepllm", 2, w)
    plans = build_rank_plans(is_sep, rule, None, cp)
    owner, local = owner_maps(L, cp)
    special = is_sep[0].clone()
    special[:2] = True
    for d, plan in enumerate(plans):
        for s in plan.recvs:
            idx = plans[s].sends[d][0]
            got = {int(p) for p in range(L) if owner[p] == s and int(local[p]) in set(idx.tolist())}
            want = set()
            for g0, _ in plan.segments:
                want |= {p for p in range(max(0, g0 - w + 1)) if special[p]} | set(range(max(0, g0 - w + 1), g0))
            assert got == {p for p in want if owner[p] == s}, (s, d)
    dense = build_rank_plans(random_separators(1, L, 0.5), rule, None, cp)
    assert sum(p.sent_keys() for p in dense) > 2 * sum(p.sent_keys() for p in plans)


def test_sequence_segments_balanced_and_contiguous():
    assert sequence_segments(16, 2, 0) == [(0, 4), (12, 16)]
    assert sequence_segments(16, 2, 1) == [(4, 12)]  # the middle rank's two segments merge
    assert sequence_segments(16, 4, 1) == [(2, 4), (12, 14)]
    assert sequence_segments(16, 4, 1, balanced=False) == [(4, 8)]
    covered = sorted(p for r in range(4) for a, b in sequence_segments(16, 4, r) for p in range(a, b))
    assert covered == list(range(16))
    with pytest.raises(ValueError, match="not divisible by 8"):
        sequence_segments(20, 4, 0)


@pytest.mark.parametrize("docs_len", [None, 10])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_blocks_match_dense_causal(cp, docs_len):
    """Ring attention's steps (rank r attends to each rank's chunk in ring order, merging by lse;
    backward accumulates each chunk's gradient) give dense causal attention."""
    B, Hq, Hkv, L = 2, 4, 2, 64
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, 8)
    docs = random_documents(B, L, docs_len) if docs_len else None
    rule = SepRule("full", separate_documents=docs is not None)
    segs = [placed(sequence_segments(L, cp, r)) for r in range(cp)]
    chunk = [lambda x, r=r: take_segments(x, sequence_segments(L, cp, r), 2) for r in range(cp)]
    scale = 8 ** -0.5
    outs, lses = [], []
    for r in range(cp):
        out = torch.zeros_like(chunk[r](q))
        lse = torch.full(out.shape[:3], float("-inf"))
        for step in range(cp):
            j = (r - step) % cp
            blocks_forward(chunk[r](q), chunk[j](k), chunk[j](v), segs[r], segs[j], docs, scale, out, lse)
        outs.append(out)
        lses.append(lse)
    want_out, want_dq, want_dk, want_dv = [t.float() for t in reference_fp64(
        q, k, v, grad, torch.ones(B, L, dtype=torch.bool), rule, docs)]
    full = torch.zeros_like(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dk_chunks = [torch.zeros_like(chunk[j](k)) for j in range(cp)]
    dv_chunks = [torch.zeros_like(chunk[j](v)) for j in range(cp)]
    for r in range(cp):
        dq_r = torch.zeros_like(outs[r])
        for step in range(cp):
            j = (r - step) % cp
            blocks_backward(chunk[r](grad), chunk[r](q), chunk[j](k), chunk[j](v), outs[r], lses[r], segs[r], segs[j],
                            docs, scale, dq_r, dk_chunks[j], dv_chunks[j])
        for a, b, off in segs[r]:
            full[:, :, a:b] = outs[r][:, :, off:off + b - a]
            dq[:, :, a:b] = dq_r[:, :, off:off + b - a]
    for j in range(cp):
        for a, b, off in segs[j]:
            dk[:, :, a:b] = dk_chunks[j][:, :, off:off + b - a]
            dv[:, :, a:b] = dv_chunks[j][:, :, off:off + b - a]
    for name, a, b in (("out", full, want_out), ("dq", dq, want_dq), ("dk", dk, want_dk), ("dv", dv, want_dv)):
        assert rel_err(a, b) <= TOL, f"{name}: rel err {rel_err(a, b):.2e}"
    if docs is None:
        assert rel_err(full, dense_causal_attention(q, k, v, rule)) <= TOL


def test_layout_orders_tp_cp_dp_pp_and_chunks_follow_cp_rank():
    from distributed_helpers import model_tree

    from megatron.config import config_from_tree
    from megatron.parallel import layout_from_config
    from megatron.parallel.context_parallel import sequence_chunk

    cfg = config_from_tree(model_tree(model_parallel_size=2, context_parallel_size=2))
    ranks = [layout_from_config(cfg, 8, r) for r in range(8)]
    assert [(lay.tp_rank, lay.cp_rank, lay.dp_rank) for lay in ranks[:4]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0),
                                                                            (1, 1, 0)]
    assert (ranks[5].dp_rank, ranks[5].dp_size, ranks[5].cp_size) == (1, 2, 2)
    labels = torch.arange(16)[None]
    assert sequence_chunk(labels, ranks[0]).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert sequence_chunk(labels, ranks[2]).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]

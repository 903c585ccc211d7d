"""Model-level behaviour: families build and train, Sep-Attention sparsity is real, hybrid layers."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron.config import config_from_tree
from megatron.model import build_model
from megatron.parallel import ParallelLayout, vocab_parallel_cross_entropy

FAMILIES = {
    "neox": dict(norm="layernorm", rotary_pct=0.25, gpt_j_residual=True, activation="gelu", no_weight_tying=True),
    "llama": dict(norm="rmsnorm", rotary_pct=1.0, activation="swiglu", num_kv_heads=2,
                  use_bias_in_attn_linear=False, use_bias_in_mlp=False),
    "gpt2": dict(norm="layernorm", pos_emb="learned", activation="gelu_tanh"),
}
SEPS = [5, 6]


def build(extra=None, layers=2, vocab=64, **sep):
    tree = dict(num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=48,
                attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4, **sep}})
    tree.update(extra or {})
    torch.manual_seed(0)
    return build_model(config_from_tree(tree), vocab, SEPS, eod_id=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_initial_loss_and_backward(family):
    model = build(FAMILIES[family], vocab=128)
    tokens = torch.randint(1, 128, (2, 25))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - math.log(128)) < 0.3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_full_mode_equals_sepllm_with_wide_window():
    tokens = torch.randint(1, 64, (2, 30))
    full = build(mode="full")
    wide = build(mode="sepllm", n_local=64)
    assert torch.allclose(full(tokens), wide(tokens), atol=1e-5)


def positions_affected(model, tokens, j):
    base = model(tokens)
    t2 = tokens.clone()
    t2[0, j] = 1 if tokens[0, j] != 1 else 2
    changed = (model(t2) - base).abs().amax(-1)[0] > 1e-6
    return set(torch.nonzero(changed).flatten().tolist())


def test_non_separator_token_only_reaches_its_local_window():
    model = build(layers=1, n_init=2, n_local=4)
    tokens = torch.randint(7, 64, (1, 30))  # no separators at all
    j = 10
    # one layer: only queries i with i - j < n_local see position j (plus j itself)
    assert positions_affected(model, tokens, j) == set(range(j, j + 4))


def test_separator_and_initial_tokens_reach_every_later_query():
    model = build(layers=1, n_init=2, n_local=4)
    tokens = torch.randint(7, 64, (1, 30))
    tokens[0, 12] = SEPS[0]
    # changing the separator into another separator keeps it visible: every later query changes
    base = model(tokens)
    t2 = tokens.clone()
    t2[0, 12] = SEPS[1]
    changed = ((model(t2) - base).abs().amax(-1)[0] > 1e-6).nonzero().flatten().tolist()
    assert changed == list(range(12, 30))
    assert positions_affected(model, tokens, 1) == set(range(1, 30))  # initial token


def test_hybrid_layers_are_full_attention():
    model = build(layers=3, full_attention_layers=[0, -1])
    assert [r.mode for r in model.rules] == ["full", "sepllm", "full"]
    one_full = build(layers=1, full_attention_layers=[0], n_local=2)
    tokens = torch.randint(7, 64, (1, 20))
    assert positions_affected(one_full, tokens, 3) == set(range(3, 20))


def test_streamingllm_ignores_separators_and_fixed_interval_uses_positions():
    tokens = torch.randint(7, 64, (1, 30))
    tokens[0, 12] = SEPS[0]
    stream = build(layers=1, mode="streamingllm")
    assert positions_affected(stream, tokens, 12) == set(range(12, 16))
    fixed = build(layers=1, mode="fixed_interval", interval=5)
    assert positions_affected(fixed, tokens, 14) == set(range(14, 30))  # position 14: (14 % 5) == 4
    assert positions_affected(fixed, tokens, 12) == set(range(12, 16))


def test_separate_documents_blocks_cross_document_attention():
    model = build(layers=1, separate_documents=True, n_local=64)
    tokens = torch.randint(7, 64, (1, 30))
    tokens[0, 9] = 0  # EOD closes document 0 (positions 0..9)
    assert max(positions_affected(model, tokens, 3)) == 9
    assert min(positions_affected(model, tokens, 15)) == 15


def test_vocab_parallel_cross_entropy_matches_torch_at_tp1():
    """The sharded-vocabulary autograd function itself (tp == 1 routes to torch / the fused kernel; the
    TP2 layout tests compare the two paths end to end)."""
    from megatron.parallel.cross_entropy import _VocabParallelCrossEntropy

    logits = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (2, 6))
    ours = _VocabParallelCrossEntropy.apply(logits, target, ParallelLayout())
    assert torch.allclose(vocab_parallel_cross_entropy(logits, target, ParallelLayout()).double(), ours.double())
    ref = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    assert torch.allclose(ours.double(), ref)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g1.double(), g2, atol=1e-6)

"""Streaming-SepLLM KV cache and engine vs. the model's own full forward (tiny random models)."""
from typing import List

import pytest
import torch

import megatron.attention.reference as reference_attention_module
from megatron.config import config_from_tree
from megatron.errors import InferenceError
from megatron.inference import CacheConfig, StreamingEngine
from megatron.model import GPTModel, build_model

SEPS = [5, 6]
VOCAB = 64
FAMILIES = {
    "neox": dict(rotary_pct=0.5, gpt_j_residual=True, no_weight_tying=True),
    "llama_gqa": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2, use_bias_in_attn_linear=False),
    "gpt2": dict(pos_emb="learned", activation="gelu_tanh"),
}


def build(family="neox", layers=2, seq=64, **sep) -> GPTModel:
    tree = dict(num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=seq,
                attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4, **sep}})
    tree.update(FAMILIES[family])
    torch.manual_seed(0)
    return build_model(config_from_tree(tree), VOCAB, SEPS, eod_id=0).eval()


def stream(n: int, sep_every: int = 5, seed: int = 1) -> torch.Tensor:
    """Random tokens with a separator every ``sep_every`` positions (no separators when 0)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(7, VOCAB, (n,), generator=g)
    if sep_every:
        tokens[sep_every - 1::sep_every] = SEPS[0]
    return tokens


def decode_all(engine: StreamingEngine, tokens: torch.Tensor, check=None) -> torch.Tensor:
    out = []
    for t in tokens.tolist():
        out.append(engine.step(t))
        if check is not None:
            check(engine)
    return torch.stack(out)


def full_logits(model: GPTModel, tokens: torch.Tensor, positions=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None], positions=positions)[0]


# ---------------------------------------------------------------- large budget == full attention
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["sepllm", "streamingllm", "full"])
def test_budget_larger_than_stream_equals_full_attention(family, policy):
    model = build(family, mode="full")
    tokens = stream(40)
    ref = full_logits(model, tokens)
    engine = StreamingEngine(model, CacheConfig(policy, 4, 8, 8, 64))  # pos shift on: place == position here
    assert torch.allclose(decode_all(engine, tokens), ref, atol=1e-5)
    assert engine.cache.compressions == 0 and engine.cache.evicted == 0
    engine.reset()
    assert torch.allclose(engine.forward(tokens, all_logits=True, chunk_size=7), ref, atol=1e-5)


# ---------------------------------------------------------------- small budget: what is kept
def simulate_sepllm(flags: List[bool], a: int, s: int, w: int, c: int) -> List[List[int]]:
    """Independent list model of the policy: kept stream positions after each appended token."""
    cache: List[int] = []
    n_seps = 0
    history = []
    for pos in range(len(flags)):
        if len(cache) + 1 > c:
            init, seps, window = cache[:a], cache[a:a + n_seps], cache[a + n_seps:]
            past, local = window[:len(window) - w], window[len(window) - w:]
            seps = seps + [p for p in past if flags[p]]
            seps = seps[len(seps) - s:] if len(seps) > s else seps
            n_seps = len(seps)
            cache = init + seps + local
        cache.append(pos)
        history.append(list(cache))
    return history


@pytest.mark.parametrize("a,s,w,c,sep_every", [(2, 3, 4, 12, 5), (4, 0, 3, 9, 3), (1, 6, 5, 14, 2), (2, 2, 4, 10, 0)])
def test_small_budget_keeps_init_separators_windows(a, s, w, c, sep_every):
    model = build(layers=1, mode="full")
    tokens = stream(90, sep_every)
    flags = [t in SEPS for t in tokens.tolist()]
    expected = simulate_sepllm(flags, a, s, w, c)
    engine = StreamingEngine(model, CacheConfig("sepllm", a, s, w, c))
    seen = []

    def check(e: StreamingEngine) -> None:
        kept = e.cache.kept_positions()
        assert len(kept) <= c
        i = len(seen)
        seen.append(kept)
        assert kept[:a] == list(range(min(a, i + 1)))  # initial tokens always kept
        assert set(range(max(0, i - w), i + 1)) <= set(kept)  # last w + the new one always kept
        regions = e.cache.region_sizes()
        assert sum(regions.values()) == len(kept) and regions["separators"] <= s
        seps = kept[regions["initial"]:regions["initial"] + regions["separators"]]
        assert all(flags[p] for p in seps)
        assert e.cache.kept_token_ids() == [int(tokens[p]) for p in kept]

    decode_all(engine, tokens, check)
    assert seen == expected
    assert engine.cache.compressions > 0


def test_kept_set_is_the_equivalent_mask(monkeypatch):
    """With decode_mask 'cache', query i attends exactly to the entries kept at step i, so the streamed
    logits equal a full forward whose mask row i is that kept set (every layer)."""
    model = build(layers=2, mode="sepllm")
    tokens = stream(60, 4)
    a, s, w, c = 2, 3, 5, 14
    flags = [t in SEPS for t in tokens.tolist()]
    kept = simulate_sepllm(flags, a, s, w, c)
    mask = torch.zeros(1, len(tokens), len(tokens), dtype=torch.bool)
    for i, row in enumerate(kept):
        mask[0, i, row] = True
    monkeypatch.setattr(reference_attention_module, "dense_mask", lambda *args, **kw: mask)
    ref = full_logits(model, tokens)
    engine = StreamingEngine(model, CacheConfig("sepllm", a, s, w, c, enable_pos_shift=False))
    assert torch.allclose(decode_all(engine, tokens), ref, atol=1e-5)


def test_streamingllm_equals_init_plus_local_mask():
    """StreamingLLM evicts one oldest non-initial entry per step once full, so query i sees
    j < a or i - j < c - a: the Sep-Attention rule with no separators, n_init = a, n_local = c - a."""
    a, c = 2, 10
    tokens = stream(50, 3)
    ref = full_logits(build(mode="streamingllm", n_init=a, n_local=c - a), tokens)
    engine = StreamingEngine(build(mode="full"), CacheConfig("streamingllm", a, 0, 4, c, enable_pos_shift=False))
    out = decode_all(engine, tokens, lambda e: e.cache.length <= c)
    assert torch.allclose(out, ref, atol=1e-5)
    assert engine.cache.kept_positions() == [0, 1] + list(range(50 - (c - a), 50))


# ---------------------------------------------------------------- positional shift
@pytest.mark.parametrize("pos_shift", [True, False])
def test_positions_used_for_rotary(pos_shift):
    """One layer: cached K/V depend on the token only, so each step equals a fresh forward over the
    kept tokens at places 0..n-1 (pos shift) or at their stream positions (no shift)."""
    model = build(layers=1, mode="full")
    tokens = stream(60, 4)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 3, 4, 12, enable_pos_shift=pos_shift))
    for i, t in enumerate(tokens.tolist()):
        logits = engine.step(t)
        kept = engine.cache.kept_positions()
        n = len(kept)
        if pos_shift:  # every key (the query's own at n - 1) is rotated by its place in the cache
            assert engine.cache.kept_rotary_positions() == list(range(n))
            ref = full_logits(model, tokens[kept])[-1]
        else:
            assert engine.cache.kept_rotary_positions() == kept
            ref = full_logits(model, tokens[kept], positions=torch.tensor([kept]))[-1]
        assert torch.allclose(logits, ref, atol=1e-5), i
    assert engine.cache.compressions > 0


def test_learned_positions_stream_beyond_training_length_with_pos_shift():
    model = build("gpt2", seq=24, mode="full")
    tokens = stream(70, 4)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 4, 6, 20))
    logits = decode_all(engine, tokens)
    assert torch.isfinite(logits).all() and engine.cache.length <= 20
    no_shift = StreamingEngine(model, CacheConfig("sepllm", 2, 4, 6, 20, enable_pos_shift=False))
    with pytest.raises(InferenceError, match="learned positions"):
        decode_all(no_shift, tokens)
    with pytest.raises(InferenceError, match="learned positions"):
        StreamingEngine(model, CacheConfig("sepllm", 2, 4, 6, 30))


# ---------------------------------------------------------------- equivalence with the Sep-Attention mask
@pytest.mark.parametrize("family", ["neox", "llama_gqa"])
@pytest.mark.parametrize("cache_size,chunk", [(200, None), (200, 5), (24, None), (24, 3)])
def test_rule_decoding_equals_sep_attention_forward(family, cache_size, chunk):
    """decode_mask 'rule' reproduces the training mask. With init_cache_size >= n_init, local_size >=
    n_local - 1 and room for every separator, compression drops only keys the rule hides anyway, so the
    equality also holds at a budget far below the stream length (cache_size 24 here)."""
    n_init, n_local = 2, 4
    model = build(family, mode="sepllm", n_init=n_init, n_local=n_local)
    tokens = stream(64, 6)
    ref = full_logits(model, tokens)
    cfg = CacheConfig("sepllm", n_init, 12, n_local - 1, cache_size, enable_pos_shift=False, decode_mask="rule")
    engine = StreamingEngine(model, cfg)
    out = engine.forward(tokens, all_logits=True, chunk_size=chunk) if chunk else decode_all(engine, tokens)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (engine.cache.compressions > 0) == (cache_size < 64)


def test_fixed_interval_model_keeps_every_interval_th_position():
    """FixLLM: the cache's 'separators' are every interval-th position, matching the model's rule."""
    model = build(mode="fixed_interval", interval=5)
    tokens = stream(64, 0)
    cfg = CacheConfig("sepllm", 2, 14, 3, 24, enable_pos_shift=False, decode_mask="rule")
    engine = StreamingEngine(model, cfg)
    assert torch.allclose(decode_all(engine, tokens), full_logits(model, tokens), atol=1e-5)
    assert engine.cache.compressions > 0
    regions = engine.cache.region_sizes()
    seps = engine.cache.kept_positions()[2:2 + regions["separators"]]
    assert seps and all(p % 5 == 4 for p in seps)


def test_rule_decoding_needs_local_window_of_n_local_minus_one():
    model = build(mode="sepllm", n_init=2, n_local=4)
    tokens = stream(64, 6)
    ref = full_logits(model, tokens)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 12, 2, 20, enable_pos_shift=False, decode_mask="rule"))
    assert not torch.allclose(decode_all(engine, tokens), ref, atol=1e-5)


def test_hybrid_full_layer_under_rule_mask_without_compression():
    model = build(layers=3, mode="sepllm", full_attention_layers=[0])
    tokens = stream(40, 6)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 8, 8, 100, enable_pos_shift=False, decode_mask="rule"))
    assert torch.allclose(decode_all(engine, tokens), full_logits(model, tokens), atol=1e-5)

"""ALiBi and BiPE in the model, its config checks, streaming inference and the HF export."""
from __future__ import annotations

import pytest
import torch
from test_alibi_bipe import bilevel_by_definition, slopes_by_definition

from megatron.config import config_from_tree
from megatron.convert.families import family_for_model
from megatron.errors import ConfigError, ConversionError, InferenceError
from megatron.inference import CacheConfig, StreamingEngine
from megatron.model import build_model
from megatron.parallel import layout_for_rank

SEPS = [5, 6]
VOCAB = 64


def tree(**extra):
    t = dict(num_layers=2, hidden_size=48, num_attention_heads=6, num_kv_heads=2, seq_length=48,
             attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4}})
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(t.get(key), dict):
            t[key] = {**t[key], **value}
        else:
            t[key] = value
    return t


def build(**extra):
    torch.manual_seed(0)
    return build_model(config_from_tree(tree(**extra)), VOCAB, SEPS, eod_id=0)


def tokens_with_separators(B=2, L=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(7, VOCAB, (B, L), generator=g)
    tokens[torch.rand(B, L, generator=g) < 0.15] = SEPS[0]
    tokens[:, 9] = SEPS[1]
    return tokens


def test_rotary_bipe_model_embeds_intra_and_rotates_by_segment():
    model = build(bipe=True, rotary_pct=0.5)
    tokens = tokens_with_separators()
    intra, inter = bilevel_by_definition(tokens, SEPS)
    want = model.embed.weight[tokens] + model.pos_embed[intra]
    assert torch.equal(model.embed_tokens(tokens), want)
    inp = model.attention_inputs(tokens)
    rot = model.config.head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    assert torch.allclose(inp.cos.double(), torch.cos(inter[..., None].double() * inv_freq), atol=1e-6)
    assert inp.alibi is None
    assert model.pos_embed.shape == (48, 48)  # the intra-segment table: max_position_embeddings rows


def test_bipe_separators_can_differ_from_sep_attention_separators():
    model = build(bipe=True, bipe_separator_ids=[6], pos_emb="alibi")
    tokens = tokens_with_separators()
    _, inter = bilevel_by_definition(tokens, [6])
    inp = model.attention_inputs(tokens)
    assert torch.equal(inp.alibi.positions, inter)
    assert torch.equal(inp.is_sep, torch.isin(tokens, torch.tensor(SEPS)))  # the Sep rule keeps its own


@pytest.mark.parametrize("bipe", [False, True])
def test_alibi_model_impls_agree_and_train(bipe: bool):
    ref = build(pos_emb="alibi", bipe=bipe)
    compact = build(pos_emb="alibi", bipe=bipe, attention={"impl": "compact"})
    compact.load_state_dict(ref.state_dict())
    tokens = tokens_with_separators()
    assert ref.alibi_slopes == pytest.approx(slopes_by_definition(6), rel=1e-12)
    assert torch.allclose(ref(tokens), compact(tokens), atol=1e-5)
    loss = compact(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compact.parameters())


def test_each_tensor_parallel_rank_biases_its_own_heads():
    """TP2 of 6 heads, rank 1 built alone (no process group): heads 3-5 and their slopes."""
    cfg = config_from_tree(tree(pos_emb="alibi"))
    shard = build_model(cfg, VOCAB, SEPS, layout=layout_for_rank(2, 1, tp=2))
    assert shard.alibi_slopes == pytest.approx(slopes_by_definition(6)[3:], rel=1e-12)
    inp = shard.attention_inputs(tokens_with_separators())
    assert inp.alibi.slopes.tolist() == pytest.approx(slopes_by_definition(6)[3:], rel=1e-6)


def test_alibi_changes_the_model_and_full_mode_equals_a_wide_window():
    tokens = tokens_with_separators()
    alibi = build(pos_emb="alibi", attention={"sepllm": {"mode": "full"}})
    wide = build(pos_emb="alibi", attention={"sepllm": {"n_local": 64}})
    none = build(pos_emb="none", attention={"sepllm": {"mode": "full"}})
    assert torch.allclose(alibi(tokens), wide(tokens), atol=1e-5)
    assert not torch.allclose(alibi(tokens), none(tokens), atol=1e-3)


@pytest.mark.parametrize("extra,match", [
    (dict(bipe=True, pos_emb="learned"), "bipe: true needs pos_emb 'rotary' or 'alibi'"),
    (dict(bipe=True, bipe_separator_ids=[]), "bipe_separator_ids is empty"),
    (dict(bipe=True, pos_emb="alibi", attention={"impl": "flash"}), "cannot run ALiBi-BiPE"),
    (dict(pos_emb="alibbi"), "expected one of 'rotary', 'learned', 'none', 'alibi'"),
])
def test_position_configs_rejected_before_launch(extra, match):
    with pytest.raises(ConfigError, match=match):
        config_from_tree(tree(**extra))


def test_bipe_without_any_separator_is_rejected():
    with pytest.raises(ConfigError, match="BiPE needs separator ids"):
        build_model(config_from_tree(tree(bipe=True)), VOCAB, [], eod_id=0)


# ------------------------------------------------------------------ streaming and export
def stream(n: int, sep_every: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(7, VOCAB, (n,), generator=g)
    tokens[sep_every - 1::sep_every] = SEPS[0]
    return tokens


@pytest.mark.parametrize("cache_size", [200, 24])
def test_alibi_rule_decoding_equals_the_sep_attention_forward(cache_size: int):
    """Without positional shift the bias uses stream positions, so decoding reproduces training."""
    model = build(pos_emb="alibi").eval()
    tokens = stream(64)
    with torch.no_grad():
        ref = model(tokens[None])[0]
    cfg = CacheConfig("sepllm", 2, 12, 3, cache_size, enable_pos_shift=False, decode_mask="rule")
    engine = StreamingEngine(model, cfg)
    out = torch.stack([engine.step(t) for t in tokens.tolist()])
    assert torch.allclose(out, ref, atol=1e-5)
    assert (engine.cache.compressions > 0) == (cache_size < 64)


def test_alibi_positional_shift_measures_distance_in_cache_places():
    """One full-attention layer: each step equals a fresh forward over the kept tokens at places 0..n-1."""
    model = build(pos_emb="alibi", num_layers=1, attention={"sepllm": {"mode": "full"}}).eval()
    tokens = stream(50, 4)
    engine = StreamingEngine(model, CacheConfig("sepllm", 2, 3, 4, 12))
    for t in tokens.tolist():
        logits = engine.step(t)
        with torch.no_grad():
            ref = model(tokens[engine.cache.kept_positions()][None])[0, -1]
        assert torch.allclose(logits, ref, atol=1e-5)
    assert engine.cache.compressions > 0


def test_streaming_and_export_refuse_what_they_cannot_express():
    with pytest.raises(InferenceError, match="BiPE"):
        StreamingEngine(build(bipe=True).eval(), CacheConfig("sepllm", 2, 12, 3, 24))
    for extra, what in ((dict(pos_emb="alibi"), "ALiBi"), (dict(bipe=True), "BiPE")):
        cfg = config_from_tree(tree(**extra))
        with pytest.raises(ConversionError, match=f"{what} .*cannot be exported"):
            family_for_model(cfg)
        with pytest.raises(ConversionError, match=what):
            family_for_model(cfg, "GPTNeoXForCausalLM")


@pytest.mark.parametrize("overlay,pos_emb", [("alibi_bipe", "alibi"), ("rotary_bipe", "rotary")])
def test_shipped_bipe_overlays_build_pythia_160m_with_the_intra_segment_table(overlay: str, pos_emb: str):
    from megatron.config import load_config
    from megatron.model import num_parameters

    files = ["configs/pythia/160M.yml", "configs/sepllm/n64_HT.yml"]
    base, _ = load_config(files, log=lambda m: None)
    cfg, _ = load_config(files + [f"configs/sepllm/{overlay}.yml"], log=lambda m: None)
    assert (cfg.model.pos_emb, cfg.model.bipe, cfg.attention.sepllm.full_attention_layers) == (pos_emb, True, [0, -1])
    extra = num_parameters(build_model(cfg, 50304, SEPS, device="meta")) - \
        num_parameters(build_model(base, 50304, SEPS, device="meta"))
    assert extra == 2048 * 768  # BiPE's learned table: max_position_embeddings x hidden_size

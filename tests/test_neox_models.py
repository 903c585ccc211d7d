"""A ported NeoX config builds the model NeoX builds: published parameter counts (on the meta device),
NeoX's initialisations, norms and attention dropout."""
import math
from pathlib import Path

import pytest
import torch

from megatron.config import config_from_tree, load_config
from megatron.errors import ConfigError
from megatron.model import build_model, num_parameters
from megatron.model.init import init_method_by_name
from megatron.tokenizer import padded_vocab_size

DIALECT = Path(__file__).resolve().parent / "data" / "neox_dialect"
NEOX_TOKENIZER_VOCAB = 50277  # GPT-NeoX-20B / Pythia tokenizer, before NeoX pads it
LLAMA_VOCAB = 32000

# The Pythia suite's published total parameter counts (untied embeddings), with each size's shape
# and the model_parallel_size its NeoX config trains with (the vocabulary is padded by 128 x that).
PYTHIA = {
    "70M": (6, 512, 8, 1, 70_426_624), "160M": (12, 768, 12, 1, 162_322_944),
    "410M": (24, 1024, 16, 1, 405_334_016), "1B": (16, 2048, 8, 1, 1_011_781_632),
    "1.4B": (24, 2048, 16, 1, 1_414_647_808), "2.8B": (32, 2560, 32, 1, 2_775_208_960),
    "6.9B": (32, 4096, 32, 2, 6_857_302_016), "12B": (36, 5120, 40, 4, 11_846_072_320),
}


def count(cfg, tokenizer_vocab):
    vocab = padded_vocab_size(tokenizer_vocab, cfg.model.make_vocab_size_divisible_by,
                              cfg.parallel.model_parallel_size)
    return num_parameters(build_model(cfg, vocab, device="meta"))


@pytest.mark.parametrize("size", sorted(PYTHIA, key=lambda s: PYTHIA[s][-1]))
def test_ported_pythia_config_builds_the_published_parameter_count(tmp_path, size):
    layers, hidden, heads, tp, published = PYTHIA[size]
    overlay = tmp_path / "size.yml"  # NeoX dialect, as pythia/<size>.yml would differ from 160M.yml
    overlay.write_text(f'{{"num-layers": {layers}, "hidden-size": {hidden}, "num-attention-heads": {heads}, '
                       f'"model-parallel-size": {tp}, "attention-config": [[["flash"], {layers}]]}}\n')
    cfg, _ = load_config([str(DIALECT / "my_neox_160M.yml"), str(overlay)], log=lambda m: None)
    assert count(cfg, NEOX_TOKENIZER_VOCAB) == published


def test_ported_llama_7B_and_neox_20B_build_their_counts():
    llama, _ = load_config([str(DIALECT / "neox_llama_7B.yml")], log=lambda m: None)
    assert count(llama, LLAMA_VOCAB) == 6_738_415_616  # NeoX's 2/3 rule turns 32768 into SwiGLU 11008
    neox20b = config_from_tree({"num_layers": 44, "hidden_size": 6144, "num_attention_heads": 64,
                                "rotary_pct": 0.25, "gpt_j_residual": True, "no_weight_tying": True,
                                "model_parallel_size": 2, "seq_length": 2048}, log=lambda m: None)
    assert count(neox20b, NEOX_TOKENIZER_VOCAB) == 20_554_567_680


@pytest.mark.parametrize("name, std", [
    ("normal", lambda L, h: 0.02), ("scaled_normal", lambda L, h: 0.02 / math.sqrt(2 * L)),
    ("single_residual_scaled_normal", lambda L, h: 0.02 / math.sqrt(L)),
    ("small_init", lambda L, h: math.sqrt(2 / (5 * h))), ("wang_init", lambda L, h: 2 / L / math.sqrt(h)),
    ("xavier_normal", lambda L, h: math.sqrt(2 / (h + 3 * h))),
    ("xavier_uniform", lambda L, h: math.sqrt(6 / (h + 3 * h)) / math.sqrt(3)),
])
def test_init_methods_follow_neox_formulas(name, std):
    L, h = 6, 256
    w = init_method_by_name(name, 0.02, L, h)((3 * h, h), torch.Generator().manual_seed(0))
    assert w.shape == (3 * h, h) and abs(w.mean()) < 3e-3
    assert w.std().item() == pytest.approx(std(L, h), rel=0.02)
    if name == "xavier_uniform":
        assert w.abs().max() <= math.sqrt(6 / (4 * h))


@pytest.mark.parametrize("name, gain", [("orthogonal", math.sqrt(2)), ("scaled_orthogonal", math.sqrt(2 / 6))])
def test_orthogonal_inits(name, gain):
    for shape in ((96, 32), (32, 96)):
        w = init_method_by_name(name, 0.02, 6, 32)(shape, torch.Generator().manual_seed(1)).double()
        small = w.T @ w if shape[0] > shape[1] else w @ w.T
        torch.testing.assert_close(small, gain ** 2 * torch.eye(min(shape), dtype=torch.float64), atol=1e-5, rtol=0)


def test_model_uses_the_configured_inits_norm_bias_and_epsilon():
    L, h = 4, 256
    cfg = config_from_tree({"num_layers": L, "hidden_size": h, "num_attention_heads": 4, "seq_length": 16,
                            "init_method": "small_init", "output_layer_init_method": "wang_init",
                            "use_bias_in_norms": False, "no_weight_tying": True}, log=lambda m: None)
    model = build_model(cfg, 512)
    params = dict(model.named_parameters())
    small, wang = math.sqrt(2 / (5 * h)), 2 / L / math.sqrt(h)
    for name, std in (("embed.weight", small), ("lm_head.weight", small), ("layers.0.attention.qkv.weight", small),
                      ("layers.1.mlp.fc_in.weight", small), ("layers.2.attention.dense.weight", wang),
                      ("layers.3.mlp.fc_out.weight", wang)):
        assert params[name].std().item() == pytest.approx(std, rel=0.03), name
    assert not any(n.endswith("norm.bias") for n in params)
    with_bias = build_model(config_from_tree({"num_layers": L, "hidden_size": h, "num_attention_heads": 4,
                                              "seq_length": 16, "no_weight_tying": True}), 512, device="meta")
    assert num_parameters(with_bias) - num_parameters(model) == (2 * L + 1) * h
    rms = config_from_tree({"norm": "rmsnorm", "rms_norm_epsilon": 1e-6, "layernorm_epsilon": 1e-3})
    assert build_model(rms, 64, device="meta").final_norm.eps == 1e-6


def dropout_model(mode, impl, p=0.5):
    tree = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 24, "attention_dropout": p,
            "attention": {"impl": impl, "sepllm": {"mode": mode, "n_init": 2, "n_local": 4}}}
    torch.manual_seed(0)
    return build_model(config_from_tree(tree, log=lambda m: None), 64, [5], eod_id=0)


@pytest.mark.parametrize("mode, impl", [("full", "auto"), ("full", "compact"), ("sepllm", "reference"),
                                        ("sepllm", "sdpa")])
def test_attention_dropout_is_applied_in_training_only(mode, impl):
    model, tokens = dropout_model(mode, impl), torch.randint(0, 64, (2, 24))
    model.eval()
    clean = model(tokens)
    reference = dropout_model(mode, impl, p=0.0).eval()(tokens)
    torch.testing.assert_close(clean, reference)  # same weights; no dropout at evaluation
    model.train()
    a, b = model(tokens), model(tokens)
    assert not torch.allclose(a, b) and not torch.allclose(a, clean)


@pytest.mark.parametrize("impl", ["auto", "compact", "flex"])
def test_attention_dropout_is_refused_before_launch_for_kernels_without_it(impl):
    with pytest.raises(ConfigError, match=f"attention_dropout 0.5 is not implemented by attention.impl {impl}"):
        dropout_model("sepllm", impl)
    dropout_model("sepllm", impl, p=0.0)
    hybrid = {"num_layers": 2, "attention_dropout": 0.1,
              "attention": {"impl": impl, "sepllm": {"mode": "sepllm", "full_attention_layers": [0, 1]}}}
    assert config_from_tree(hybrid, log=lambda m: None).model.attention_dropout == 0.1  # every layer dense

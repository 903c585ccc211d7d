"""Tiny random-init HF models and our-side helpers shared by the tests/test_hf_*.py files, plus unit
tests of the layout helpers (QKV fusing, rope keys of transformers v4 and v5 configs)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from megatron.checkpointing import load_checkpoint
from megatron.config import config_from_tree, load_config
from megatron.convert.common import fuse_qkv, split_qkv
from megatron.convert.families import rope_settings
from megatron.model import GPTModel, build_model

transformers = pytest.importorskip("transformers")

VOCAB = 100


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter (biases and norm weights too) random, so a swapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm_weight else 0.0))
    return model.eval()


def tiny_neox(**overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000.0,
               use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
               attention_dropout=0.0, hidden_dropout=0.0)
    cfg.update(overrides)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg))


def tiny_llama(**overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, rope_theta=500.0,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def tiny_gpt2(**overrides):
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def tiny_falcon(**overrides):
    """Falcon-7B layout by default: old decoder architecture, multi-query, parallel attention + MLP
    sharing one layernorm, no biases, tied embeddings."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, new_decoder_architecture=False, multi_query=True,
               parallel_attn=True, bias=False, alibi=False, hidden_dropout=0.0, attention_dropout=0.0,
               rope_theta=1000.0, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return transformers.FalconForCausalLM(transformers.FalconConfig(**cfg))


BUILDERS = {"neox": tiny_neox, "llama": tiny_llama, "gpt2": tiny_gpt2, "falcon": tiny_falcon}


def save_hf(model, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    randomize(model, seed)
    model.save_pretrained(path)
    return path


def our_model(model_yml: Path, ckpt: str, mode: str = "full") -> GPTModel:
    """Our model for the imported YAML, with plain causal attention, weights from ``ckpt``."""
    cfg, _ = load_config([str(model_yml)], log=lambda _: None)
    from megatron.config import config_to_tree
    tree = config_to_tree(cfg)
    tree["attention"] = {"impl": "sdpa" if mode == "full" else "reference", "sepllm": {"mode": mode}}
    cfg = config_from_tree(tree)
    padded = -(-VOCAB // cfg.model.make_vocab_size_divisible_by) * cfg.model.make_vocab_size_divisible_by
    model = build_model(cfg, padded)
    load_checkpoint(ckpt, model)
    return model.eval()


def our_greedy(model: GPTModel, prompt: torch.Tensor, steps: int, vocab: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        logits = model.full_logits(tokens)[:, -1, :vocab]  # padded rows are not real tokens
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def hf_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)


def safetensors_state(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: Dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def prompt_tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 1)])
def test_fuse_split_qkv_inverse_and_group_layout(heads: int, kv: int):
    d, hidden = 3, 5
    q, k, v = (torch.randn(n * d, hidden) for n in (heads, kv, kv))
    fused = fuse_qkv(q, k, v, heads, kv)
    group = heads // kv
    rows: List[torch.Tensor] = list(fused.view(kv, group + 2, d, hidden))
    for g, block in enumerate(rows):  # KV group g: its query heads, then its k and v
        assert torch.equal(block[:group].reshape(-1, hidden), q[g * group * d:(g + 1) * group * d])
        assert torch.equal(block[group], k[g * d:(g + 1) * d])
        assert torch.equal(block[group + 1], v[g * d:(g + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, kv), (q, k, v)))


def test_rope_settings_reads_v4_and_v5_spellings():
    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}}
    assert rope_settings(v5, 0.25) == (500.0, 0.5, "default")
    v4_neox = {"rotary_pct": 0.25, "rotary_emb_base": 10000, "rope_scaling": None}
    assert rope_settings(v4_neox, 1.0) == (10000.0, 0.25, "default")
    v4_llama = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_settings(v4_llama, 1.0) == (500000.0, 1.0, "linear")
    assert rope_settings({}, 0.25) == (10000.0, 0.25, "default")

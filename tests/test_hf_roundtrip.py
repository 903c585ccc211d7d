"""HF -> ours -> HF for GPT-NeoX (partial rotary, parallel residual, untied), Llama (GQA) and GPT-2:
logits, greedy generation, bit-identical re-export, AutoModel loading, TP2/PP2 layouts, and the
config-key / file-layout variants that make other converters crash or produce gibberish."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_hf_common import (
    BUILDERS,
    VOCAB,
    hf_greedy,
    our_greedy,
    our_model,
    prompt_tokens,
    safetensors_state,
    save_hf,
    tiny_llama,
    tiny_neox,
    transformers,
)

from megatron.convert import export_hf, import_hf

VARIANTS = {
    "neox": ("neox", {}),
    "neox_sequential_tied": ("neox", dict(use_parallel_residual=False, tie_word_embeddings=True, rotary_pct=0.5)),
    "llama_gqa": ("llama", {}),
    "llama_tied_biases": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                        num_key_value_heads=1)),
    "gpt2": ("gpt2", {}),
    "falcon_7b_multi_query": ("falcon", {}),
    "falcon_40b_new_arch_gqa": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, bias=True,
                                               tie_word_embeddings=False)),
    "falcon_new_arch_one_norm": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2,
                                                num_ln_in_parallel_attn=1)),
    "falcon_sequential": ("falcon", dict(parallel_attn=False, multi_query=False, bias=True)),
}


def quiet(_: str) -> None:
    pass


def convert(tmp_path: Path, hf_model, **import_kw):
    hf_dir = save_hf(hf_model, tmp_path / "hf")
    result = import_hf(str(hf_dir), str(tmp_path / "ckpt"), seq_length=32, divisible_by=64, progress=False,
                       log=quiet, **import_kw)
    return hf_dir, result


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_logits_generation_and_weights(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    hf = BUILDERS[family](**overrides)
    hf_dir, result = convert(tmp_path, hf)
    ours = our_model(result.config_path, str(tmp_path / "ckpt"))
    tokens = prompt_tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(ours.full_logits(tokens)[..., :VOCAB], ref, atol=1e-5, rtol=0)
    assert torch.equal(our_greedy(ours, tokens[:, :6], 10, VOCAB), hf_greedy(hf, tokens[:, :6], 10))

    out = tmp_path / "out"
    export_hf(str(tmp_path / "ckpt"), str(out), progress=False, log=quiet)
    original, exported = safetensors_state(hf_dir), safetensors_state(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, ref)
    config = json.loads((out / "config.json").read_text())
    # an imported HF model is a full-attention model: it comes back as the stock class, no remote code
    assert config["sepllm"]["mode"] == "full" and config["vocab_size"] == VOCAB and "auto_map" not in config
    assert not (out / "modeling_sepllm.py").exists()
    again = import_hf(str(out), str(tmp_path / "again"), seq_length=32, divisible_by=64, progress=False, log=quiet)
    assert yaml.safe_load(again.config_path.read_text()) == yaml.safe_load(result.config_path.read_text())
    first, second = (torch.load(p / "global_step0" / "model_tp00_pp00.pt", weights_only=True)
                     for p in (tmp_path / "ckpt", tmp_path / "again"))
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_tp2_pp2_checkpoint_exports_the_same_weights_as_tp1(tmp_path):
    hf = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    hf_dir = save_hf(hf, tmp_path / "hf")
    import_hf(str(hf_dir), str(tmp_path / "tp1"), seq_length=32, divisible_by=64, progress=False, log=quiet)
    import_hf(str(hf_dir), str(tmp_path / "tp2pp2"), tp=2, pp=2, seq_length=32, divisible_by=64,
              progress=False, log=quiet)
    step = tmp_path / "tp2pp2" / "global_step0"
    assert json.loads((step / "manifest.json").read_text())["layout"] == {"tp": 2, "pp": 2, "dp": 1, "cp": 1}
    assert sorted(p.name for p in step.glob("model_*.pt")) == sorted(
        f"model_tp{t:02d}_pp{p:02d}.pt" for p in range(2) for t in range(2))
    shard = torch.load(step / "model_tp01_pp00.pt", weights_only=True)
    assert shard["layers.0.attention.qkv.weight"].shape[0] == (4 + 2 * 2) * 8 // 2  # one KV group per rank
    for name in ("tp1", "tp2pp2"):
        export_hf(str(tmp_path / name), str(tmp_path / f"out_{name}"), progress=False, log=quiet)
    a, b = safetensors_state(tmp_path / "out_tp1"), safetensors_state(tmp_path / "out_tp2pp2")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    original = safetensors_state(hf_dir)
    assert all(torch.equal(original[k], b[k]) for k in original)


def legacy_neox_dir(tmp_path: Path) -> Path:
    """A GPT-NeoX directory as older transformers wrote it: v4 config keys, .bin shards with an
    index, and the non-parameter buffers old checkpoints carry."""
    hf = tiny_neox(rotary_pct=0.5)
    src = save_hf(hf, tmp_path / "v5")
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"], rope_scaling=None,
                  torch_dtype="float32", _name_or_path="EleutherAI/pythia-tiny", transformers_version="4.38.0",
                  bos_token_id=0, eos_token_id=0)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(config))
    state = safetensors_state(src)
    for i in range(2):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, legacy / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (legacy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return legacy


def test_legacy_v4_config_keys_bin_shards_and_buffers(tmp_path):
    legacy = legacy_neox_dir(tmp_path)
    result = import_hf(str(legacy), str(tmp_path / "ckpt"), seq_length=32, divisible_by=64, progress=False,
                       log=quiet)
    cfg_text = result.config_path.read_text()
    assert "rotary_pct: 0.5" in cfg_text and "gpt_j_residual: true" in cfg_text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v5").eval()
    ours = our_model(result.config_path, str(tmp_path / "ckpt"))
    tokens = prompt_tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.full_logits(tokens)[..., :VOCAB], hf(tokens).logits, atol=1e-5, rtol=0)


def test_original_gpt2_names_without_transformer_prefix(tmp_path):
    hf = BUILDERS["gpt2"]()
    src = save_hf(hf, tmp_path / "hf")
    state = {k.removeprefix("transformer."): v for k, v in safetensors_state(src).items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64)
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    result = import_hf(str(src), str(tmp_path / "ckpt"), seq_length=32, divisible_by=64, progress=False, log=quiet)
    ours = our_model(result.config_path, str(tmp_path / "ckpt"))
    tokens = prompt_tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.full_logits(tokens)[..., :VOCAB], hf(tokens).logits, atol=1e-5, rtol=0)


CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def test_tokenizer_files_travel_both_ways(tmp_path):
    """tokenizer.json, tokenizer_config.json and a chat model's chat_template.jinja: imported next to the
    checkpoint, exported with the bos/eos/pad ids; tools/generate.py renders the template as transformers
    does and stops at the model's eos as well as at the end-of-document token."""
    tokenizers = pytest.importorskip("tokenizers")
    from megatron.tokenizer import build_tokenizer
    from megatron.tokenizer.chat import render_chat, stop_ids

    vocab = {f"t{i}": i for i in range(VOCAB - 2)}
    vocab["<|im_end|>"] = VOCAB - 2
    vocab["<|endoftext|>"] = VOCAB - 1
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_dir = save_hf(tiny_neox(), tmp_path / "hf")
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}))
    (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    result = import_hf(str(hf_dir), str(tmp_path / "ckpt"), seq_length=32, divisible_by=64, progress=False,
                       log=quiet)
    copied = tmp_path / "ckpt" / "tokenizer" / "tokenizer.json"
    assert copied.is_file() and f"vocab_file: {copied.resolve()}" in result.config_path.read_text()
    assert (tmp_path / "ckpt" / "tokenizer" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    out = tmp_path / "out"
    export_hf(str(tmp_path / "ckpt"), str(out), progress=False, log=quiet)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    for name in ("generation_config.json", "config.json"):
        config = json.loads((out / name).read_text())
        assert (config["eos_token_id"], config["pad_token_id"]) == (VOCAB - 2, VOCAB - 1), name

    ours = build_tokenizer("HFTokenizer", str(copied))
    assert stop_ids(ours) == [VOCAB - 2, VOCAB - 1]
    messages = [{"role": "system", "content": "t1 t2"}, {"role": "user", "content": "t3"}]
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert render_chat(ours, messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    assert render_chat(ours, messages) == "<|im_start|>system\nt1 t2<|im_end|>\n<|im_start|>user\nt3<|im_end|>\n" \
                                          "<|im_start|>assistant\n"

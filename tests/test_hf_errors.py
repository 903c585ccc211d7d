"""Bad input to the converters: a ConversionError naming what is wrong; the CLIs print one line
and exit 2 without a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file
from test_hf_common import safetensors_state, save_hf, tiny_falcon, tiny_llama, tiny_neox

from megatron.checkpointing import save_checkpoint
from megatron.config import config_from_tree, config_to_tree
from megatron.convert import export_hf, import_hf
from megatron.errors import ConversionError
from megatron.model import build_model


def quiet(_: str) -> None:
    pass


def do_import(src: Path, dst: Path, **kw):
    return import_hf(str(src), str(dst), seq_length=32, divisible_by=64, progress=False, log=quiet, **kw)


def edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def neox_dir(tmp_path) -> Path:
    return save_hf(tiny_neox(), tmp_path / "hf")


def test_unknown_architecture_names_it_and_the_supported_ones(neox_dir, tmp_path):
    edit_config(neox_dir, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ConversionError, match="unsupported architecture MistralForCausalLM.*LlamaForCausalLM"):
        do_import(neox_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_config_disagreeing_with_weights_names_tensor_and_shapes(neox_dir, tmp_path):
    edit_config(neox_dir, intermediate_size=128)
    with pytest.raises(ConversionError, match=r"'gpt_neox\.layers\.0\.mlp\.dense_h_to_4h\.weight' has shape "
                                              r"\[96, 64\] but .*config\.json implies \[128, 64\]"):
        do_import(neox_dir, tmp_path / "ckpt")


def test_missing_and_unexpected_tensors(neox_dir, tmp_path):
    state = safetensors_state(neox_dir)
    save_file({k: v for k, v in state.items() if k != "embed_out.weight"}, str(neox_dir / "model.safetensors"))
    with pytest.raises(ConversionError, match="tensor 'embed_out.weight' is missing"):
        do_import(neox_dir, tmp_path / "ckpt")
    save_file({**state, "gpt_neox.layers.0.mlp.extra.weight": torch.zeros(2)}, str(neox_dir / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected tensors \['gpt_neox.layers.0.mlp.extra.weight'\]"):
        do_import(neox_dir, tmp_path / "ckpt")


def test_missing_shard_of_a_sharded_checkpoint(neox_dir, tmp_path):
    state = safetensors_state(neox_dir)
    (neox_dir / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    save_file({k: state[k] for k in shards["model-00001-of-00002.safetensors"]},
              str(neox_dir / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (neox_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing from .*: model-00002-of-00002.safetensors"):
        do_import(neox_dir, tmp_path / "ckpt")


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json' not found"):
        do_import(tmp_path / "empty", tmp_path / "ckpt")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_neox().config.to_dict()))
    with pytest.raises(ConversionError, match="holds no weights: expected one of model.safetensors"):
        do_import(tmp_path / "empty", tmp_path / "ckpt")


def test_rope_scaling_and_head_dim_mismatch_are_refused(tmp_path):
    llama = save_hf(tiny_llama(), tmp_path / "hf")
    edit_config(llama, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0})
    with pytest.raises(ConversionError, match="rope type 'llama3'"):
        do_import(llama, tmp_path / "ckpt")
    edit_config(llama, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, head_dim=16)
    with pytest.raises(ConversionError, match="head_dim 16 != hidden_size / num_attention_heads = 8"):
        do_import(llama, tmp_path / "ckpt")


def test_layout_that_does_not_divide_the_heads(neox_dir, tmp_path):
    with pytest.raises(ConversionError, match="num_attention_heads 4 is not divisible by model_parallel_size 3"):
        do_import(neox_dir, tmp_path / "ckpt", tp=3)


def test_non_empty_output_needs_force(neox_dir, tmp_path):
    do_import(neox_dir, tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="save directory .* is not empty; pass --force"):
        do_import(neox_dir, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ConversionError, match="output directory .* is not empty; pass --force"):
        export_hf(str(tmp_path / "ckpt"), str(out), progress=False, log=quiet)
    (out / "model-00001-of-00009.safetensors").write_text("stale")
    export_hf(str(tmp_path / "ckpt"), str(out), force=True, progress=False, log=quiet)
    assert not (out / "model-00001-of-00009.safetensors").exists() and (out / "notes.txt").exists()


def our_checkpoint(tmp_path: Path, **model_keys) -> Path:
    tree = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16, **model_keys)
    cfg = config_from_tree(tree)
    save_checkpoint(str(tmp_path / "ours"), 3, build_model(cfg, 64), None, {"consumed_samples": 0},
                    config_to_tree(cfg))
    return tmp_path / "ours"


def test_export_refuses_models_no_hf_class_expresses(tmp_path):
    ckpt = our_checkpoint(tmp_path, norm="rmsnorm", activation="gelu")
    with pytest.raises(ConversionError, match="no HF architecture matches pos_emb=rotary, norm=rmsnorm, "
                                              "activation=gelu"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet)
    ckpt = our_checkpoint(tmp_path, num_kv_heads=2)
    with pytest.raises(ConversionError, match="GPTNeoXForCausalLM has no grouped-query attention"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet,
                  architecture="gpt_neox")
    # GQA with layernorm goes to Falcon, whose sequential layout has one or all KV heads only
    with pytest.raises(ConversionError, match="FalconForCausalLM with sequential attention \\+ MLP needs "
                                              "num_kv_heads 1 or 4; this model has 2"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet)
    with pytest.raises(ConversionError, match="unknown architecture 'MistralForCausalLM'"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet,
                  architecture="MistralForCausalLM")
    with pytest.raises(ConversionError, match="vocab size 65 .* does not fit the checkpoint's 64"):
        export_hf(str(our_checkpoint(tmp_path)), str(tmp_path / "out"), vocab_size=65, progress=False, log=quiet)


def test_sep_attention_export_needs_separator_ids_and_a_sane_cache(tmp_path):
    ckpt = our_checkpoint(tmp_path, attention={"sepllm": {"mode": "sepllm"}})  # no tokenizer for separators
    with pytest.raises(ConversionError, match="the separator ids are unknown: .*set attention.sepllm.separator_ids"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet)
    ckpt = our_checkpoint(tmp_path / "b", attention={"sepllm": {"mode": "sepllm", "separator_ids": [5]}})
    with pytest.raises(ConversionError, match="cache settings: SepLLM cache needs init_cache_size \\+ sep_cache_size"):
        export_hf(str(ckpt), str(tmp_path / "out"), vocab_size=60, progress=False, log=quiet, cache={"cache_size": 300})
    learned = our_checkpoint(tmp_path / "c", pos_emb="learned",
                             attention={"sepllm": {"mode": "sepllm", "separator_ids": [5]}})
    with pytest.raises(ConversionError, match="^cache_size 800 exceeds the model's 16 learned positions; pass a "
                                              "smaller --cache-size \\(positional shift keeps positions below it\\)$"):
        export_hf(str(learned), str(tmp_path / "o"), vocab_size=60, progress=False, log=quiet)
    res = run_cli(["tools/ckpts/convert_to_hf.py", "--input", str(learned), "--output", str(tmp_path / "o"),
                   "--vocab-size", "60", "--quiet", "--cache-size", "16", "--local-size", "8", "--sep-cache-size", "2"])
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_sepllm.SepLLMGPT2LMHeadModel"}
    assert config["sepllm"]["cache"] == {"policy": "sepllm", "init_cache_size": 4, "sep_cache_size": 2, "local_size": 8,
                                         "cache_size": 16, "enable_pos_shift": True, "decode_mask": "cache"}


def test_export_missing_model_shard_and_missing_checkpoint(neox_dir, tmp_path):
    do_import(neox_dir, tmp_path / "ckpt", tp=2)
    (tmp_path / "ckpt" / "global_step0" / "model_tp01_pp00.pt").unlink()
    with pytest.raises(ConversionError, match="missing shard model_tp01_pp00.pt"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), progress=False, log=quiet)
    with pytest.raises(ConversionError, match="'.*nowhere' does not exist"):
        export_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False, log=quiet)


def test_clis_print_one_line_and_exit_2(neox_dir, tmp_path):
    edit_config(neox_dir, architectures=["MptForCausalLM"], model_type="mpt")
    res = run_cli(["tools/ckpts/convert_from_hf.py", "--input", str(neox_dir), "--save", str(tmp_path / "c"),
                   "--quiet"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "convert_from_hf: error: config.json: unsupported architecture MptForCausalLM; supported: "
        "GPTNeoXForCausalLM (gpt_neox), LlamaForCausalLM (llama), GPT2LMHeadModel (gpt2), FalconForCausalLM (falcon)"]
    falcon_rw = save_hf(tiny_falcon(alibi=True, parallel_attn=False, multi_query=False), tmp_path / "rw")
    with pytest.raises(ConversionError, match="^config.json: alibi = true \\(Falcon-RW's ALiBi positions\\) is not "
                                              "supported; only rotary Falcon models convert$"):
        do_import(falcon_rw, tmp_path / "c2")
    res = run_cli(["tools/ckpts/convert_to_hf.py", "--input", str(tmp_path / "nowhere"), "--output",
                   str(tmp_path / "o"), "--quiet"])
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "nowhere' does not exist" in res.stderr


def test_gguf_input_that_is_missing_or_not_gguf_is_one_line(tmp_path):
    res = run_cli(["tools/ckpts/convert_from_hf.py", "--input", str(tmp_path / "model.gguf"), "--save",
                   str(tmp_path / "c"), "--quiet"])
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"convert_from_hf: error: GGUF file '{tmp_path / 'model.gguf'}' not found"]
    assert not (tmp_path / "c").exists()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file" * 8)
    res = run_cli(["tools/ckpts/convert_from_hf.py", "--input", str(tmp_path / "bad.gguf"), "--save",
                   str(tmp_path / "c"), "--quiet"])
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert f"'{tmp_path / 'bad.gguf'}' could not be read as a GGUF model by transformers" in res.stderr
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # the temporary HF directory is gone

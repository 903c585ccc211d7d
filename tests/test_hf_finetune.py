"""The SepLLM post-training path end to end: HF model -> import -> 20 Trainer steps with
Sep-Attention (configs/finetune_example.yml overlay) -> export -> loads in transformers."""
from __future__ import annotations

import json
import shutil

import torch
from conftest import TOKENIZER, write_config
from test_hf_common import safetensors_state, save_hf, tiny_neox, transformers

from megatron.checkpointing import load_checkpoint
from megatron.config import config_from_tree, config_to_tree, load_config
from megatron.convert import export_hf, import_hf
from megatron.model import build_model
from megatron.training.trainer import Trainer

TOKENIZER_VOCAB = 4096  # data/sample/tokenizer.json


def test_import_finetune_with_sep_attention_export(tiny_dataset, tmp_path):
    hf = tiny_neox(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64)
    hf_dir = save_hf(hf, tmp_path / "hf")
    shutil.copyfile(TOKENIZER, hf_dir / "tokenizer.json")
    imported = import_hf(str(hf_dir), str(tmp_path / "import"), seq_length=32, progress=False, log=lambda _: None)

    overlay = write_config(tmp_path / "test_overlay.yml", {
        "load": str(tmp_path / "import"), "save": str(tmp_path / "finetune"), "data_path": tiny_dataset,
        "split": "90,10,0", "train_iters": 20, "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1, "precision": "fp32", "eval_interval": 1000, "eval_iters": 1,
        "log_interval": 5, "log_dir": None, "checkpoint_factor": 0,
        "optimizer": {"params": {"lr": 2.0e-3}},
        "attention": {"impl": "compact", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 8}}})
    cfg, _ = load_config([str(imported.config_path), "configs/finetune_example.yml", overlay], log=lambda _: None)
    assert cfg.checkpoint.finetune and cfg.attention.sepllm.mode == "sepllm"
    trainer = Trainer(cfg, log=lambda _: None)
    assert trainer.vocab_size == TOKENIZER_VOCAB  # the imported embedding fits the trainer's padding
    embed_before = trainer.model.embed.weight.detach().clone()
    assert torch.equal(embed_before, hf.gpt_neox.embed_in.weight)
    losses = trainer.train()
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0]

    out = tmp_path / "exported"
    export_hf(str(tmp_path / "finetune"), str(out), progress=False, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["sepllm"]["mode"] == "sepllm" and config["sepllm"]["n_local"] == 8
    assert config["sepllm"]["separator_ids"] == sorted(trainer.separator_ids)
    assert (out / "tokenizer.json").is_file()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not torch.equal(tuned.gpt_neox.embed_in.weight, hf.gpt_neox.embed_in.weight)
    assert sorted(safetensors_state(out)) == sorted(safetensors_state(hf_dir))

    # The export is faithful: the fine-tuned checkpoint under plain causal attention gives HF's logits.
    tree = config_to_tree(cfg)
    tree["attention"] = {"impl": "sdpa", "sepllm": {"mode": "full"}}
    ours = build_model(config_from_tree(tree), TOKENIZER_VOCAB)
    load_checkpoint(str(tmp_path / "finetune"), ours)
    tokens = torch.randint(0, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().full_logits(tokens), tuned(tokens).logits, atol=1e-5, rtol=0)

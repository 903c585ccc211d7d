"""Trainer end to end: exact resume, data-parallel equality through deepy.py, clear errors."""
import json

import pytest
from conftest import free_port, run_cli, tiny_config_tree, write_config

from megatron.config import config_from_tree
from megatron.training.trainer import Trainer


def train_losses(tree) -> list:
    trainer = Trainer(config_from_tree(tree), log=lambda m: None)
    return trainer.train()


def test_resume_is_bit_exact(tiny_dataset, tmp_path):
    full = train_losses(tiny_config_tree(tiny_dataset, train_iters=6))
    save = str(tmp_path / "ckpt")
    first = train_losses(tiny_config_tree(tiny_dataset, train_iters=6, save=save, checkpoint_factor=3,
                                          exit_interval=3))
    assert first == full[:3]
    resumed = train_losses(tiny_config_tree(tiny_dataset, train_iters=6, save=save, load=save,
                                            checkpoint_factor=3))
    assert resumed == full[3:]  # bit-exact: same float at every step


def test_resume_with_accumulation_and_dropout_is_bit_exact(tiny_dataset, tmp_path):
    kw = dict(train_iters=4, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=2,
              hidden_dropout=0.1, attention={"impl": "reference"})
    full = train_losses(tiny_config_tree(tiny_dataset, **kw))
    save = str(tmp_path / "ckpt")
    train_losses(tiny_config_tree(tiny_dataset, save=save, exit_interval=2, **kw))
    assert train_losses(tiny_config_tree(tiny_dataset, save=save, load=save, **kw)) == full[2:]


def test_loss_falls(tiny_dataset):
    losses = train_losses(tiny_config_tree(tiny_dataset, train_iters=30, warmup=0.1))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_logged_loss_is_the_mean_over_the_logging_window(tiny_dataset, tmp_path):
    tree = tiny_config_tree(tiny_dataset, train_iters=5, log_interval=2, log_dir=str(tmp_path / "log"))
    losses = train_losses(tree)
    records = [json.loads(ln) for ln in open(tmp_path / "log" / "metrics.jsonl") if "train/loss" in ln]
    assert [r["iteration"] for r in records] == [2, 4, 5]  # and the last iteration, mid-window
    want = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]
    assert [r["train/loss"] for r in records] == pytest.approx(want, abs=1e-12)
    assert [r["train/last_loss"] for r in records] == [losses[1], losses[3], losses[4]]
    assert all(r["train/tokens_per_sec"] > 0 for r in records)


def read_losses(log_dir) -> list:
    records = [json.loads(ln) for ln in open(f"{log_dir}/metrics.jsonl")]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow  # CI's slow step; the default tier covers this path elsewhere
@pytest.mark.distributed
def test_dp2_through_deepy_matches_single_process(tiny_dataset, tmp_path):
    single = tiny_config_tree(tiny_dataset, train_micro_batch_size_per_gpu=4, log_dir=str(tmp_path / "one"))
    dp2 = tiny_config_tree(tiny_dataset, train_micro_batch_size_per_gpu=2, log_dir=str(tmp_path / "two"))
    out1 = run_cli(["deepy.py", "--num-procs", "1", "train.py", write_config(tmp_path / "one.yml", single)])
    assert out1.returncode == 0, out1.stderr[-2000:]
    out2 = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "train.py",
                    write_config(tmp_path / "two.yml", dp2)])
    assert out2.returncode == 0, out2.stderr[-2000:]
    assert "dp=2" in out2.stdout
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5


def one_line_error(out, *fragments):
    assert out.returncode != 0
    err = out.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_yaml_unknown_key_missing_data(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("num_layers: [2\n")
    one_line_error(run_cli(["train.py", str(bad)]), "bad.yml: invalid YAML at line")
    unknown = write_config(tmp_path / "unknown.yml", {**tiny_config_tree(tiny_dataset), "num_layer": 2})
    one_line_error(run_cli(["deepy.py", "train.py", unknown]), "unknown key 'num_layer'", "did you mean 'num_layers'")
    missing = write_config(tmp_path / "missing.yml", tiny_config_tree(str(tmp_path / "nowhere")))
    one_line_error(run_cli(["train.py", missing]), "data_path", "nowhere.bin", "not found")


def test_unwritable_checkpoint_dir_fails_before_training(tiny_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    cfg = write_config(tmp_path / "c.yml", tiny_config_tree(tiny_dataset, save=str(blocker / "ckpt")))
    one_line_error(run_cli(["train.py", cfg]), "key 'save'", "not writable")
    assert blocker.read_text() == "keep me"


def test_missing_or_empty_load_starts_from_scratch_unless_finetuning(tiny_dataset, tmp_path):
    """NeoX's save == load habit: a run whose load directory has nothing yet starts fresh (one line);
    finetune needs weights, so there it is an error."""
    save = tmp_path / "ckpt"
    tree = tiny_config_tree(tiny_dataset, train_iters=2, save=str(save), load=str(save))
    out = run_cli(["train.py", write_config(tmp_path / "c.yml", tree)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("holds no checkpoint yet; starting from scratch") == 1
    assert (save / "latest").is_file()
    again = run_cli(["train.py", write_config(tmp_path / "c4.yml", {**tree, "train_iters": 4})])
    assert "resumed from" in again.stdout and "iter      4/4" in again.stdout, again.stdout[-2000:]
    for missing in (tmp_path / "none", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        cfg = write_config(tmp_path / "f.yml", tiny_config_tree(tiny_dataset, load=str(missing), finetune=True))
        one_line_error(run_cli(["train.py", cfg]), "finetune: true needs weights", "key 'load'")


# ----------------------------------------------------------------------------- device and data at start
def test_only_what_the_device_cannot_run_is_refused():
    from megatron.config import validate_device
    from megatron.errors import ConfigError

    def check(device, interpreter=False, **tree):
        validate_device(config_from_tree(tree, log=lambda *_: None), device, interpreter)

    for tree, message in ((dict(fused_rope=True), "fused_rope: true needs a CUDA device"),
                          (dict(attention={"impl": "flash"}), "'flash' needs flash_attn on a CUDA")):
        with pytest.raises(ConfigError, match=message):
            check("cpu", **tree)
    check("cpu", precision="fp16")  # our own fp16 loss scaling runs on CPU
    check("cpu", precision="bf16", zero_optimization={"stage": 2})
    check("cpu", interpreter=True, fused_rope=True, fused_layernorm=True)
    check("cuda", fused_rope=True, attention={"impl": "flash"})


def test_zero_fp16_without_deepspeed_fp16_is_one_line_before_training(tiny_dataset, tmp_path):
    from megatron.config.validation import deepspeed_fp16_device

    if deepspeed_fp16_device()[1]:
        pytest.skip("DeepSpeed runs fp16 on this machine, so ZeRO with fp16 is allowed")
    tree = tiny_config_tree(tiny_dataset, precision="fp16", zero_optimization={"stage": 1})
    one_line_error(run_cli(["train.py", write_config(tmp_path / "c.yml", tree)]),
                   "precision fp16 with zero_optimization.stage 1: DeepSpeed has no fp16")


def test_a_dataset_shorter_than_one_sequence_or_a_split_rounded_to_nothing_warns_once(tmp_path):
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    def dataset(name, docs):
        with IndexedDatasetBuilder(str(tmp_path / name), np.int32) as builder:
            for doc in docs:
                builder.add_document(np.array(doc))
        return str(tmp_path / name)

    def warnings(data_path, split):
        logs = []
        Trainer(config_from_tree(tiny_config_tree(data_path, split=split, train_iters=1)), log=logs.append).train()
        return [m for m in logs if m.startswith("warning:")]

    short = dataset("short", [list(range(5, 25))])  # 20 tokens, seq_length 32
    assert warnings(short, "100,0,0") == [f"warning: the train part of '{short}' holds 20 tokens, fewer than one "
                                          "sequence (seq_length 32 + 1): every sample repeats the same text"]
    three = dataset("three", [list(range(5, 45))] * 3)
    assert warnings(three, "90,10,0") == [f"warning: split '90,10,0' rounds the valid part of '{three}' (3 documents "
                                          "in all) to zero documents: no validation"]
    assert warnings(dataset("many", [list(range(5, 45))] * 20), "90,10,0") == []


def test_train_main_called_from_python_leaves_the_signal_handlers_as_they_were(tmp_path, capsys):
    """A notebook or test calling train.main must keep its Ctrl-C: only `python train.py` (exiting=True)
    turns late stop signals into an immediate exit with the run's code."""
    import signal

    import train
    from megatron.training.exit_signals import EXIT_SIGNALS

    before = {s: signal.getsignal(s) for s in EXIT_SIGNALS}
    assert train.main([str(tmp_path / "missing.yml")]) == 2
    assert "missing.yml" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in EXIT_SIGNALS} == before

"""A NeoX-dialect config trains: ZeRO-1 on one process and on two, and the NeoX habits that come with
it (test set at the end, extra_save_iters, num_workers, FLOPs/MFU/ETA in the log, kept-KV logs,
wandb's offline fallback, tensorboard)."""
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOKENIZER, free_port, run_cli, tiny_config_tree

from megatron.config import config_from_tree, load_config, validate_launch
from megatron.errors import ConfigError
from megatron.training import metrics
from megatron.training.throughput import Throughput, flops_per_token
from megatron.training.trainer import Trainer

DIALECT = ROOT / "tests" / "data" / "neox_dialect"


def overlay(tmp_path: Path, data: str, run: str) -> str:
    """tiny_overlay.yml plus where this test's data, tokenizer and checkpoints are."""
    text = (DIALECT / "tiny_overlay.yml").read_text()
    text += f'"data-path": "{data}"\n"vocab-file": "{TOKENIZER}"\n"save": "{tmp_path / run}"\n'
    text += f'"log-dir": "{tmp_path / run / "log"}"\n'
    path = tmp_path / f"{run}.yml"
    path.write_text(text)
    return str(path)


def losses(log_dir: Path, prefix="train") -> list:
    records = [json.loads(ln) for ln in open(log_dir / "metrics.jsonl")]
    return [r[f"{prefix}/loss"] for r in records if f"{prefix}/loss" in r]


def dense_reference_losses(tiny_dataset, tmp_path) -> list:
    """The same run without ZeRO, in this process (ZeRO-1 on one rank is plain AdamW)."""
    cfg, _ = load_config([str(DIALECT / "my_neox_160M.yml"), overlay(tmp_path, tiny_dataset, "dense")],
                         log=lambda m: None)
    cfg.parallel.zero_optimization.stage = 0
    cfg.checkpoint.save = None
    Trainer(cfg, log=lambda m: None).train()
    return losses(tmp_path / "dense" / "log")


def test_neox_160M_recipe_trains_with_zero1_on_one_process(tiny_dataset, tmp_path):
    """python deepy.py train.py my_neox_160M.yml tiny_overlay.yml: NeoX's spelling end to end."""
    out = run_cli(["deepy.py", "train.py", str(DIALECT / "my_neox_160M.yml"), overlay(tmp_path, tiny_dataset, "one")])
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout
    assert "config: accepted with no effect here" in log and "activation gelu runs as gelu_tanh" in log
    assert "distributed_backend nccl needs CUDA; using gloo" in log
    assert "attention, layers 0-1: full causal attention" in log  # no SepLLM key: what NeoX trains
    assert "iter      4/4" in log and "| test loss " in log and "FLOPs/s/device" in log and "ETA" in log
    assert {p.name for p in (tmp_path / "one").glob("global_step*")} == {"global_step0", "global_step2",
                                                                          "global_step4"}
    zero = losses(tmp_path / "one" / "log")
    assert len(zero) == 4 and losses(tmp_path / "one" / "log", "test")
    dense = dense_reference_losses(tiny_dataset, tmp_path)
    assert max(abs(a - b) for a, b in zip(zero, dense)) < 1e-5


@pytest.mark.slow  # two processes with DeepSpeed on a shared 2-core box: ~40 s
@pytest.mark.distributed
def test_neox_160M_recipe_trains_with_zero1_on_two_processes(tiny_dataset, tmp_path):
    two = overlay(tmp_path, tiny_dataset, "two")
    Path(two).write_text(Path(two).read_text().replace('"train_micro_batch_size_per_gpu": 2',
                                                       '"train_micro_batch_size_per_gpu": 1'))
    out = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "train.py",
                   str(DIALECT / "my_neox_160M.yml"), two])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dp=2" in out.stdout and "iter      4/4" in out.stdout
    # the same global batch of 2 sequences as one process with micro-batches of 2
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "two" / "log"),
                                          dense_reference_losses(tiny_dataset, tmp_path))) < 1e-5


def run(tree, logs=None):
    trainer = Trainer(config_from_tree(tree, log=lambda m: None), log=(logs.append if logs is not None else
                                                                        (lambda m: None)))
    return trainer, trainer.train()


def test_test_set_extra_saves_workers_and_kv_ratio(tiny_dataset, tmp_path):
    tree = tiny_config_tree(tiny_dataset, train_iters=4, data_path=None, train_data_paths=[tiny_dataset],
                            valid_data_paths=[tiny_dataset], test_data_paths=[tiny_dataset], eval_interval=1000,
                            save=str(tmp_path / "ck"), extra_save_iters=[0, 3], log_dir=str(tmp_path / "log"),
                            kv_ratio_interval=2, peak_theoretical_tflops=0.5)
    logs = []
    _, plain = run(tree, logs)
    assert {p.name for p in (tmp_path / "ck").glob("global_step*")} == {"global_step0", "global_step3",
                                                                         "global_step4"}
    test_lines = [m for m in logs if "| test loss" in m]
    assert len(test_lines) == 1 and len(losses(tmp_path / "log", "test")) == 1
    kv = [m for m in logs if "sep-attention kept" in m]
    assert len(kv) == 2 and all("% of causal attention in 2 layers" in m for m in kv)
    assert any("attention, layers 0-1: SepLLM: 2 initial + separators + local window 8" in m for m in logs)
    assert any(m.startswith("separators (") and "'.'" in m for m in logs)
    records = [json.loads(ln) for ln in open(tmp_path / "log" / "metrics.jsonl") if "train/loss" in ln]
    assert all(r["train/flops_per_sec_per_device"] > 0 and 0 < r["train/mfu"] and r["train/eta_s"] >= 0
               for r in records)
    workers = {**tree, "num_workers": 2, "save": None, "log_dir": None}
    _, with_workers = run(workers)
    assert with_workers == plain  # the DataLoader's workers prepare the same batches


def test_model_flops_count_sep_attention_at_its_kept_fraction():
    n, width, seq = 1_000_000, 256, 1024
    dense = flops_per_token(n, width, seq, [1.0, 1.0])
    assert dense == 6 * n + 2 * 12 * width * seq
    assert flops_per_token(n, width, seq, [1.0, 0.25]) == 6 * n + 12 * width * seq * 1.25
    tp = Throughput(n, width, seq, tokens_per_iter=seq * 8, world_size=2, peak_tflops=1.0, start_iteration=0,
                    total_iterations=10)
    stats = tp.report(iteration=2, window_time=4.0, window_iters=2, fractions=[1.0, 1.0])
    assert stats["flops_per_sec_per_device"] == pytest.approx(dense * seq * 8 * 2 / 4.0 / 2)
    assert stats["mfu"] == pytest.approx(stats["flops_per_sec_per_device"] / 1e12)
    assert stats["eta_s"] == pytest.approx(8 * 2.0)  # 8 iterations left at 2 s each
    assert "MFU" in Throughput.text(stats) and "ETA 0:00:16" in Throughput.text(stats)
    on_cpu = Throughput(n, width, seq, seq * 8, 2, 1.0, 0, 10, device=torch.device("cpu"))
    assert "peak_memory_gib" not in on_cpu.report(2, 4.0, 2, [1.0, 1.0])  # device memory is reported on CUDA only
    assert "peak memory 1.50 GiB" in Throughput.text({**stats, "peak_memory_gib": 1.5})


def test_wandb_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert metrics.wandb_mode("online", None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert metrics.wandb_mode("online", None) == "online"
    assert metrics.wandb_mode("online", "https://wandb.example.org") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.wandb_mode("online", "https://wandb.example.org") == "online"


def test_tensorboard_dir_is_checked_before_launch(monkeypatch, tiny_dataset, tmp_path):
    import importlib.util

    cfg = config_from_tree(tiny_config_tree(tiny_dataset, tensorboard_dir=str(tmp_path / "tb")), log=lambda m: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tensorboard_dir .* needs the tensorboard package: pip install -e "
                                          r"'\.\[tensorboard\]'"):
        validate_launch(cfg, 1)
    monkeypatch.undo()
    pytest.importorskip("tensorboard")
    run(tiny_config_tree(tiny_dataset, train_iters=2, tensorboard_dir=str(tmp_path / "tb")))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow  # DeepSpeed start-up: ~30 s
def test_zero2_on_one_process_equals_the_dense_run(tiny_dataset, tmp_path):
    two = overlay(tmp_path, tiny_dataset, "zero2")
    Path(two).write_text(Path(two).read_text() + '"zero_optimization": {"stage": 2, "contiguous_gradients": true}\n')
    out = run_cli(["deepy.py", "train.py", str(DIALECT / "my_neox_160M.yml"), two])
    assert out.returncode == 0, out.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "zero2" / "log"),
                                          dense_reference_losses(tiny_dataset, tmp_path))) < 1e-5

"""Checkpoint merge / re-shard without process groups: shards written as a TPxPP run would."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.checkpointing.checkpoint import MANIFEST, shard_metadata, shard_name
from megatron.checkpointing.reshard import build_stage_model, load_full_checkpoint, load_full_state_dict
from megatron.config import config_from_tree, config_to_tree
from megatron.training.optimizer import build_optimizer

RESHARD = Path(__file__).resolve().parents[1] / "tools" / "ckpts" / "reshard.py"
VOCAB = 64


def tiny_cfg(**kw):
    tree = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_kv_heads=2, seq_length=16,
                make_vocab_size_divisible_by=8, activation="swiglu", norm="rmsnorm", seed=3)
    tree.update(kw)
    return config_from_tree(tree)


def fake_grad(name, shape):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(*shape, generator=gen)


def write_sharded(cfg, root, tp, pp, full_grads):
    """One AdamW step per shard with the sliced full gradients, saved in the checkpoint layout."""
    root.mkdir(parents=True)
    tied = not cfg.model.no_weight_tying
    for p in range(pp):
        for t in range(tp):
            model = build_stage_model(cfg, VOCAB, tp, pp, t, p, device="cpu")
            for name, param in model.named_parameters():
                g = full_grads["embed.weight" if tied and name == "lm_head.weight" else name]
                dim = getattr(param, "tensor_parallel_dim", None)
                param.grad = g if dim is None else g.chunk(tp, dim)[t].clone()
            opt = build_optimizer(model, cfg)
            opt.step()
            torch.save(model.state_dict(), root / shard_name("model", t, p))
            torch.save(opt.state_dict(), root / shard_name("optim", t, p))
            (root / f"meta_tp{t:02d}_pp{p:02d}.json").write_text(json.dumps({"params": shard_metadata(model)}))
    (root / MANIFEST).write_text(json.dumps({"iteration": 1, "layout": {"tp": tp, "pp": pp, "dp": 1},
                                             "config": config_to_tree(cfg), "trainer": {"consumed_samples": 4},
                                             "has_optimizer": True}))


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_cfg()
    model = build_stage_model(cfg, VOCAB, 1, 1, 0, 0, device="cpu")
    grads = {n: fake_grad(n, p.shape) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt = build_optimizer(model, cfg)
    opt.step()
    names = [n for g in ([n for n, p in model.named_parameters() if p.ndim >= 2],
                         [n for n, p in model.named_parameters() if p.ndim < 2]) for n in g]
    state = {names[i]: s for i, s in opt.state_dict()["state"].items()}
    return cfg, model.state_dict(), state, grads


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2), (1, 4)])
def test_merge_equals_unsharded(reference, tmp_path, tp, pp):
    cfg, full_sd, full_state, grads = reference
    write_sharded(cfg, tmp_path / "ck", tp, pp, grads)
    merged, optim, manifest, _ = load_full_checkpoint(str(tmp_path / "ck"))
    assert set(merged) == set(full_sd)
    for name, value in full_sd.items():
        assert torch.allclose(merged[name], value, atol=1e-7), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(optim[name][key], full_state[name][key], atol=1e-7), (name, key)
    sd, _ = load_full_state_dict(str(tmp_path / "ck"))
    assert set(sd) == set(full_sd)


def test_reshard_cli_round_trip(reference, tmp_path):
    cfg, full_sd, full_state, grads = reference
    write_sharded(cfg, tmp_path / "tp2pp2", 2, 2, grads)
    tool = [sys.executable, str(RESHARD)]
    for src, dst, tp, pp in (("tp2pp2", "tp1pp4", 1, 4), ("tp1pp4", "tp2pp1", 2, 1), ("tp2pp1", "tp1", 1, 1)):
        out = subprocess.run(tool + ["--load", str(tmp_path / src), "--save", str(tmp_path / dst),
                                     "--tp", str(tp), "--pp", str(pp)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    final = tmp_path / "tp1" / "global_step1"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["layout"]["tp"] == 1 and manifest["config"]["model_parallel_size"] == 1
    model = build_stage_model(cfg, VOCAB, 1, 1, 0, 0, device="cpu")
    model.load_state_dict(torch.load(final / shard_name("model", 0, 0)))
    opt = build_optimizer(model, cfg)
    opt.load_state_dict(torch.load(final / shard_name("optim", 0, 0), weights_only=False))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), full_sd[name]), name
        assert torch.allclose(opt.state[p]["exp_avg"], full_state[name]["exp_avg"], atol=1e-7), name


def test_reshard_rejects_bad_layout(reference, tmp_path):
    cfg, _, _, grads = reference
    write_sharded(cfg, tmp_path / "ck", 2, 1, grads)
    out = subprocess.run([sys.executable, str(RESHARD), "--load", str(tmp_path / "ck"), "--save",
                          str(tmp_path / "o"), "--tp", "4"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "num_kv_heads" in out.stderr


def test_reshard_refuses_its_input_or_a_non_empty_output_unless_forced(reference, tmp_path):
    from megatron.checkpointing.reshard import check_output_dir, save_resharded
    from megatron.errors import CheckpointError

    cfg, _, _, grads = reference
    write_sharded(cfg, tmp_path / "tp2", 2, 1, grads)
    run = tmp_path / "run"
    step = save_resharded(str(tmp_path / "tp2"), str(run), 1, 1)
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    for load, save, message in ((run, run, "holds the checkpoint being re-sharded"),
                                (step, run, "holds the checkpoint being re-sharded"),
                                (step, step, "holds the checkpoint being re-sharded"),
                                (run, tmp_path / "tp2", "is not empty; pass --force")):
        with pytest.raises(CheckpointError, match=message):
            check_output_dir(str(load), str(save), force=False)
        check_output_dir(str(load), str(save), force=True)
    tool = [sys.executable, str(RESHARD), "--load", str(run), "--save", str(run), "--tp", "1", "--pp", "2"]
    out = subprocess.run(tool, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --save '{run}' holds the checkpoint being re-sharded ('{step}'), which would be replaced in place; "
        "write to a new directory, or pass --force to replace it"], out.stderr
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before  # the original, untouched
    forced = subprocess.run(tool + ["--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((step / MANIFEST).read_text())["layout"]["pp"] == 2

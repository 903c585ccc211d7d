import os

import pytest
import torch

from megatron.checkpointing import checkpoint as ckpt_mod
from megatron.checkpointing import ensure_writable, load_checkpoint, load_optimizer_state, save_checkpoint
from megatron.errors import CheckpointError
from megatron.training.optimizer import load_named_optimizer_state, named_optimizer_state


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def test_save_load_round_trip(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint(str(tmp_path), 7, model, named_optimizer_state(opt, model), {"consumed_samples": 56},
                    {"num_layers": 1})
    assert (tmp_path / "latest").read_text().strip() == "global_step7"
    other = make_model(1)
    other_opt = torch.optim.AdamW(other.parameters())
    manifest = load_checkpoint(str(tmp_path), other)
    load_named_optimizer_state(other_opt, other, load_optimizer_state(str(tmp_path), ckpt_mod.layout_of(other)))
    assert manifest["iteration"] == 7 and manifest["trainer"]["consumed_samples"] == 56
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(str(tmp_path), 1, model, named_optimizer_state(opt, model), {"consumed_samples": 8}, {})
    before = {p.name: p.read_bytes() for p in (tmp_path / "global_step1").iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # model shard written, then the process "dies" writing the optimizer
            raise KeyboardInterrupt("simulated kill")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, model, named_optimizer_state(opt, model), {"consumed_samples": 16}, {})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "global_step1"
    assert not (tmp_path / "global_step2").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "global_step1").iterdir()} == before
    fresh = make_model(5)
    assert load_checkpoint(str(tmp_path), fresh)["iteration"] == 1
    # the next save of the same step cleans the leftover temp dir and succeeds
    save_checkpoint(str(tmp_path), 2, model, named_optimizer_state(opt, model), {"consumed_samples": 16}, {})
    assert (tmp_path / "latest").read_text().strip() == "global_step2"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_keep_last_prunes(tmp_path):
    model = make_model(0)
    for it in (1, 2, 3):
        save_checkpoint(str(tmp_path), it, model, None, {"consumed_samples": it}, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step2", "global_step3"]


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"), make_model(0))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path), make_model(0))
    save_checkpoint(str(tmp_path), 1, make_model(0), None, {"consumed_samples": 0}, {})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(str(tmp_path), torch.nn.Linear(4, 4))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_dir_non_root(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(CheckpointError, match="not writable"):
        ensure_writable(str(ro / "sub"))


def test_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory is needed: unwritable even for root
    with pytest.raises(CheckpointError, match=r"checkpoint directory '.*file/ckpt' \(key 'save'\) is not writable"):
        ensure_writable(str(blocker / "ckpt"))


def test_only_the_latest_pointer_failing_says_the_checkpoint_is_whole(tmp_path, monkeypatch):
    model = make_model(0)
    save_checkpoint(str(tmp_path), 1, model, None, {"consumed_samples": 8}, {})
    real = ckpt_mod.atomic_write_text

    def full_disk_for_latest(path, text):
        if path.name == "latest":
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(ckpt_mod, "atomic_write_text", full_disk_for_latest)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(str(tmp_path), 2, model, None, {"consumed_samples": 16}, {})
    assert str(err.value) == (
        f"checkpoint '{tmp_path / 'global_step2'}' is complete, but '{tmp_path / 'latest'}' could not be updated "
        f"to name it: No space left on device; '{tmp_path / 'latest'}' still names global_step1. Resume from this "
        f"one with load: '{tmp_path / 'global_step2'}', or fix '{tmp_path}' and resume as usual")
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "global_step2"), make_model(1))["iteration"] == 2  # whole, as it says
    assert (tmp_path / "latest").read_text().strip() == "global_step1"

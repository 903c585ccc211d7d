"""Layout equivalence on CPU/gloo: TP, PP (1F1B, interleaved, GPipe), DP and their products give the
1-rank losses (5 steps) and step-1 gradients of a Sep-Attention model; TP2 -> TP1 re-shard + resume."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import merge_grads, model_tree, run_layout, train_layout

RESHARD = Path(__file__).resolve().parents[1] / "tools" / "ckpts" / "reshard.py"
pytestmark = pytest.mark.distributed
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return train_layout(model_tree(), steps=5, eval_batches=1)


def assert_same_run(ref, results, tied=True):
    losses = results[0]["losses"]
    assert len(losses) == len(ref["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(losses, ref["losses"])) < TOL, (losses, ref["losses"])
    for r in results:  # every rank reports the same (pipeline-broadcast, DP-averaged) loss
        assert r["losses"] == losses
    grads = merge_grads(results, tied=tied)
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert torch.allclose(grads[name], g, atol=TOL, rtol=0), name
    if ref["evals"]:
        assert abs(results[0]["evals"][0] - ref["evals"][0]) < TOL


def test_tp2_matches_single_rank(reference):
    assert_same_run(reference, run_layout(model_tree(model_parallel_size=2), 2, eval_batches=1))


def test_pp2_1f1b_tied_embeddings_matches_single_rank(reference):
    results = run_layout(model_tree(pipe_parallel_size=2), 2, eval_batches=1)
    assert_same_run(reference, results)
    first, last = sorted(results, key=lambda r: r["pp_rank"])
    assert "embed.weight" in first["grads"] and "lm_head.weight" in last["grads"]
    assert torch.equal(first["grads"]["embed.weight"], last["grads"]["lm_head.weight"])


def test_dp2_matches_single_rank(reference):
    assert_same_run(reference, run_layout(model_tree(gradient_accumulation_steps=2), 2, eval_batches=1))


@pytest.mark.slow
def test_pp2_interleaved_matches_single_rank(reference):
    tree = model_tree(pipe_parallel_size=2, virtual_pipe_stages=2, pipe_schedule="interleaved_1f1b")
    assert_same_run(reference, run_layout(tree, 2, eval_batches=1))


@pytest.mark.slow
def test_pp2_gpipe_untied_matches_single_rank():
    ref = train_layout(model_tree(no_weight_tying=True), steps=5)
    results = run_layout(model_tree(no_weight_tying=True, pipe_parallel_size=2, pipe_schedule="gpipe"), 2)
    assert_same_run(ref, results, tied=False)


@pytest.mark.slow
def test_tp2_dp2_matches_single_rank(reference):
    tree = model_tree(model_parallel_size=2, gradient_accumulation_steps=2)
    assert_same_run(reference, run_layout(tree, 4, eval_batches=1))


@pytest.mark.slow
def test_tp2_pp2_matches_single_rank(reference):
    assert_same_run(reference, run_layout(model_tree(model_parallel_size=2, pipe_parallel_size=2), 4,
                                          eval_batches=1))


def test_tp2_pp2_interleaved_matches_single_rank(reference):
    """Tensor x pipeline parallelism with two model chunks per pipeline rank (one layer each)."""
    tree = model_tree(model_parallel_size=2, pipe_parallel_size=2, virtual_pipe_stages=2,
                      pipe_schedule="interleaved_1f1b")
    assert_same_run(reference, run_layout(tree, 4, eval_batches=1))


def test_tp2_sequence_parallel_matches_single_rank(reference):
    """Norms and residuals on L/2 positions per rank, all-gather before and reduce-scatter after each
    TP region: same losses and gradients (norm gradients summed over the TP group)."""
    results = run_layout(model_tree(model_parallel_size=2, sequence_parallel=True), 2, eval_batches=1)
    assert_same_run(reference, results)
    norm = "layers.0.input_norm.weight"
    assert {norm, "layers.0.attention.dense.bias", "final_norm.bias"} <= set(results[0]["sequence_parallel_params"])
    assert torch.equal(results[0]["grads"][norm], results[1]["grads"][norm])


@pytest.mark.slow
def test_tp2_sequence_parallel_learned_positions_swiglu_recompute_matches_single_rank():
    tree = dict(pos_emb="learned", activation="swiglu", norm="rmsnorm", no_weight_tying=True,
                checkpoint_activations=True)
    ref = train_layout(model_tree(**tree), steps=5)
    results = run_layout(model_tree(model_parallel_size=2, sequence_parallel=True, **tree), 2)
    assert_same_run(ref, results, tied=False)


@pytest.mark.slow
def test_tp2_pp2_sequence_parallel_matches_single_rank(reference):
    tree = model_tree(model_parallel_size=2, pipe_parallel_size=2, sequence_parallel=True)
    assert_same_run(reference, run_layout(tree, 4, eval_batches=1))


def test_tp2_checkpoint_resharded_to_tp1_resumes(reference, tmp_path):
    """Save at step 3 of a TP2 run, re-shard to TP1 with the CLI, resume: steps 4-5 continue as
    the TP2 run did."""
    tp2 = run_layout(model_tree(model_parallel_size=2), 2, save_at=3, save_dir=str(tmp_path / "tp2"))
    assert max(abs(a - b) for a, b in zip(tp2[0]["losses"], reference["losses"])) < TOL
    out = subprocess.run([sys.executable, str(RESHARD), "--load", str(tmp_path / "tp2"), "--save",
                          str(tmp_path / "tp1"), "--tp", "1", "--pp", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed = train_layout(model_tree(), steps=5, load=str(tmp_path / "tp1"))
    assert len(resumed["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(resumed["losses"], tp2[0]["losses"][3:])) < TOL, (
        resumed["losses"], tp2[0]["losses"])

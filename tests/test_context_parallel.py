"""Context parallelism on gloo: CP2 / CP4 runs of a Sep-Attention model give the one-rank losses and
every step-1 gradient (fp32), for every attention variant; CP composes with TP (and sequence
parallelism), DP, pipelines and ZeRO; checkpoints move between CP sizes."""
import pytest
import torch
from distributed_helpers import merge_grads, model_tree, run_layout, train_layout

pytestmark = pytest.mark.distributed
TOL = 1e-5
SEQ = 64  # 2 x cp segments of at least the window (n_local 4) at cp 4


def tree(**overrides):
    return model_tree(**{"seq_length": SEQ, "gradient_accumulation_steps": 2, **overrides})


def assert_same_run(ref, results, steps):
    losses = results[0]["losses"]
    assert len(losses) == len(ref["losses"]) == steps
    assert max(abs(a - b) for a, b in zip(losses, ref["losses"])) < TOL, (losses, ref["losses"])
    for r in results:  # every rank reports the same (dp x cp averaged) loss
        assert r["losses"] == losses
    grads = merge_grads(results)
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert torch.allclose(grads[name], g, atol=TOL, rtol=0), (name, (grads[name] - g).abs().max())
    for r in results:  # replicas over cp hold identical gradients after the reduction
        twin = next(x for x in results if (x["tp_rank"], x["pp_rank"], x["dp_rank"], x["cp_rank"])
                    == (r["tp_rank"], r["pp_rank"], r["dp_rank"], 0))
        assert all(torch.equal(r["grads"][n], twin["grads"][n]) for n in r["grads"])


def test_cp2_sepllm_matches_single_rank():
    t = tree()
    assert_same_run(train_layout(t, steps=2), run_layout(dict(t, context_parallel_size=2), 2, steps=2), 2)


VARIANTS = {
    "sepllm": {},
    "streamingllm": {"attention": {"sepllm": {"mode": "streamingllm", "n_init": 2, "n_local": 4}}},
    "fixed_interval": {"attention": {"sepllm": {"mode": "fixed_interval", "n_init": 2, "n_local": 4,
                                                "interval": 5}}},
    "hybrid_HT": {"attention": {"sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4, "separator_ids": [3, 7, 11],
                                           "full_attention_layers": [0, -1]}}},
    "separate_documents": {"attention": {"sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4,
                                                    "separator_ids": [3, 7, 11], "separate_documents": True,
                                                    "full_attention_layers": [1]}}},  # ring with documents
    # Windows wider than a segment (halo from several ranks), learned positions, recomputed layers.
    "layer_windows_learned_positions_recompute": {
        "pos_emb": "learned", "no_weight_tying": True, "checkpoint_activations": True,
        "attention": {"impl": "compact", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4,
                                                    "separator_ids": [3, 7, 11], "layer_n_local": {1: 12, 2: 40}}}},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant,cp", [(v, cp) for v in sorted(VARIANTS) for cp in (2, 4)
                                        if (v, cp) != ("sepllm", 2)])  # that one is the default tier's
def test_cp_variants_match_single_rank(variant, cp):
    t = tree(**VARIANTS[variant])
    assert_same_run(train_layout(t, steps=2), run_layout(dict(t, context_parallel_size=cp), cp, steps=2), 2)


@pytest.fixture(scope="module")
def reference():
    return train_layout(tree(), steps=2)


@pytest.mark.slow
def test_cp2_tp2_sequence_parallel_matches_single_rank(reference):
    results = run_layout(tree(context_parallel_size=2, model_parallel_size=2, sequence_parallel=True), 4, steps=2)
    assert_same_run(reference, results, 2)


@pytest.mark.slow
def test_cp2_dp2_matches_single_rank(reference):
    results = run_layout(tree(context_parallel_size=2, gradient_accumulation_steps=1), 4, steps=2)
    assert_same_run(reference, results, 2)


@pytest.mark.slow
def test_cp2_pp2_matches_single_rank(reference):
    assert_same_run(reference, run_layout(tree(context_parallel_size=2, pipe_parallel_size=2), 4, steps=2), 2)


@pytest.mark.slow
def test_cp2_zero1_matches_single_rank(reference):
    """ZeRO partitions over the dp x cp replicas; DeepSpeed keeps the gradients, so compare the losses
    and the weights after the second step."""
    results = run_layout(tree(context_parallel_size=2, zero_optimization={"stage": 1}), 2, steps=2)
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], reference["losses"])) < TOL
    weights = merge_grads(results, key="weights")
    for name, w in reference["weights"].items():
        assert torch.allclose(weights[name], w, atol=TOL, rtol=0), name


def close(a, b):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < TOL


@pytest.mark.slow
def test_checkpoints_move_between_cp_sizes(tmp_path):
    """A CP2 run's checkpoint resumes on one rank (directly and after resharding) and a one-rank
    checkpoint on CP2: the remaining steps repeat the uninterrupted run's losses."""
    import json

    from megatron.checkpointing.reshard import save_resharded

    t, t2 = tree(), tree(context_parallel_size=2)
    cp2 = run_layout(t2, 2, steps=4, save_at=2, save_dir=str(tmp_path / "cp2"))
    manifest = json.loads((tmp_path / "cp2" / "global_step2" / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1, "cp": 2}
    assert close(train_layout(t, steps=4, load=str(tmp_path / "cp2"))["losses"], cp2[0]["losses"][2:])
    save_resharded(str(tmp_path / "cp2"), str(tmp_path / "tp2"), tp=2, pp=1)  # cp counts in the old world
    assert sorted(p.name for p in (tmp_path / "tp2" / "global_step2").glob("rng_*")) == [
        "rng_rank00000.pt", "rng_rank00001.pt"]
    save_resharded(str(tmp_path / "cp2"), str(tmp_path / "tp1"), tp=1, pp=1)
    assert close(train_layout(t, steps=4, load=str(tmp_path / "tp1"))["losses"], cp2[0]["losses"][2:])
    one = train_layout(t, steps=4, save_at=2, save_dir=str(tmp_path / "one"))
    assert close(one["losses"], cp2[0]["losses"])
    assert close(run_layout(t2, 2, steps=4, load=str(tmp_path / "one"))[0]["losses"], one["losses"][2:])

"""ALiBi and BiPE under tensor / pipeline parallelism (gloo on CPU): each rank keeps the slopes of its
own heads, so the layouts give the one-rank losses and gradients."""
import pytest
from distributed_helpers import model_tree, run_layout, train_layout
from test_parallel import assert_same_run

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_tp2_alibi_slopes_sliced_per_rank_match_single_rank():
    """4 heads over 2 ranks: rank 1 must use slopes 3-4 (1/16, 1/256), not rank 0's (1/4, 1/16)."""
    tree = model_tree(pos_emb="alibi")
    assert_same_run(train_layout(tree, steps=5), run_layout(model_tree(pos_emb="alibi", model_parallel_size=2), 2))


@pytest.mark.slow
def test_tp2_pp2_alibi_bipe_matches_single_rank():
    """ALiBi-BiPE: the first stage embeds intra-segment positions, every stage biases by segments."""
    extra = dict(pos_emb="alibi", bipe=True)
    ref = train_layout(model_tree(**extra), steps=5)
    assert_same_run(ref, run_layout(model_tree(model_parallel_size=2, pipe_parallel_size=2, **extra), 4))


@pytest.mark.slow
def test_tp2_rotary_bipe_sequence_parallel_matches_single_rank():
    extra = dict(bipe=True, sequence_parallel=True)
    ref = train_layout(model_tree(bipe=True), steps=5)
    assert_same_run(ref, run_layout(model_tree(model_parallel_size=2, **extra), 2))

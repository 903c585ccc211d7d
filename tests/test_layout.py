"""The explicit parallel layout: any rank's model shard builds in one process, without process groups
or global state, and holds exactly its slice of the one-rank model."""
import torch
import torch.distributed as dist
from distributed_helpers import SEPARATORS, VOCAB, model_tree

from megatron.config import config_from_tree
from megatron.model import build_model, num_parameters
from megatron.parallel import ParallelLayout, layout_for_rank


def test_rank_order_follows_megatron():
    # rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
    lay = layout_for_rank(8, 5, tp=2, pp=2)
    assert (lay.tp_rank, lay.dp_rank, lay.pp_rank, lay.dp_size) == (1, 0, 1, 2)
    assert lay.pp_ranks == (1, 5)
    assert [layout_for_rank(8, r, tp=2, pp=2).tp_rank for r in range(4)] == [0, 1, 0, 1]


def test_interleaved_stage_assignment():
    lay = layout_for_rank(2, 1, pp=2, virtual_pipe_stages=2)
    assert lay.stage_layer_ids(8) == [(1, [2, 3]), (3, [6, 7])]
    assert lay.layer_ids(8) == [2, 3, 6, 7]


def test_tp2_rank1_built_alone_holds_slices_of_the_one_rank_model():
    cfg = config_from_tree(model_tree(model_parallel_size=2, sequence_parallel=True))
    full = dict(build_model(cfg, VOCAB, SEPARATORS).named_parameters())
    shard = build_model(cfg, VOCAB, SEPARATORS, layout=layout_for_rank(2, 1, tp=2, sequence_parallel=True))
    assert not dist.is_initialized()
    assert shard.layout.tp_rank == 1 and shard.layout.sequence_parallel
    names = dict(shard.named_parameters())
    assert set(names) == set(full)
    split = 0
    for name, p in names.items():
        dim = getattr(p, "tensor_parallel_dim", None)
        want = full[name] if dim is None else full[name].chunk(2, dim)[1]
        assert torch.equal(p, want), name
        split += dim is not None
    assert split >= 4 * 4  # qkv, dense, fc_in, fc_out weights of every layer at least


def test_pp2_last_stage_holds_its_layers_and_a_tied_head_copy():
    cfg = config_from_tree(model_tree(pipe_parallel_size=2, gradient_accumulation_steps=2))
    full = dict(build_model(cfg, VOCAB, SEPARATORS).named_parameters())
    last = build_model(cfg, VOCAB, SEPARATORS, layout=layout_for_rank(2, 1, pp=2))
    assert sorted(last.layers) == ["2", "3"] and not hasattr(last, "embed")
    assert torch.equal(last.lm_head.weight, full["embed.weight"])  # the tied copy starts equal
    for name, p in last.named_parameters():
        if name != "lm_head.weight":
            assert torch.equal(p, full[name]), name


def test_meta_device_build_counts_parameters_without_memory():
    cfg = config_from_tree(model_tree())
    meta = build_model(cfg, VOCAB, SEPARATORS, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert num_parameters(meta) == num_parameters(build_model(cfg, VOCAB, SEPARATORS))
    assert meta.layout == ParallelLayout()

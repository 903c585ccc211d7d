"""Context parallelism through the entry points: layouts that cannot work are rejected before
launch with one line; a CP2 Trainer run through deepy.py trains and evaluates like one process."""
import pytest
from conftest import free_port, run_cli, tiny_config_tree, write_config
from test_parallel_launch import one_line_error, read_metrics

from megatron.config import config_from_tree, validate_launch
from megatron.errors import ConfigError


@pytest.mark.parametrize("overrides,world,message", [
    (dict(context_parallel_size=2), 3, "world size 3 is not divisible by model_parallel_size 1 x "
                                       "pipe_parallel_size 1 x context_parallel_size 2"),
    (dict(context_parallel_size=4, seq_length=36), 4, "seq_length 36 must be divisible by 2 x "
                                                      "context_parallel_size = 8"),
    (dict(context_parallel_size=2, model_parallel_size=4, sequence_parallel=True, seq_length=20), 8,
     "each rank's 10 positions must be divisible by model_parallel_size 4"),
    (dict(context_parallel_size=2, attention={"impl": "flex"}), 2,
     "attention.impl 'flex' does not run with context_parallel_size 2"),
    (dict(context_parallel_size=0), 1, "key 'context_parallel_size' = 0 is not valid"),
])
def test_bad_context_parallel_layouts_rejected(tmp_path, overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_launch(config_from_tree(tiny_config_tree(str(tmp_path / "unused"), **overrides)), world)


def test_bad_context_parallel_layout_is_one_line_from_deepy(tmp_path):
    cfg = write_config(tmp_path / "bad.yml", tiny_config_tree(str(tmp_path / "unused"), context_parallel_size=2,
                                                              seq_length=30))
    one_line_error(run_cli(["deepy.py", "--num-procs", "2", "train.py", cfg], timeout=120),
                   "seq_length 30 must be divisible by 2 x context_parallel_size = 4")


@pytest.mark.slow
@pytest.mark.distributed
def test_cp2_trainer_through_deepy_matches_single_process(tiny_dataset, tmp_path):
    kw = dict(train_iters=3, train_micro_batch_size_per_gpu=2, eval_interval=3, eval_iters=1)
    single = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "one"), **kw)
    cp2 = tiny_config_tree(tiny_dataset, log_dir=str(tmp_path / "cp2"), context_parallel_size=2, **kw)
    out1 = run_cli(["deepy.py", "--num-procs", "1", "train.py", write_config(tmp_path / "one.yml", single)])
    assert out1.returncode == 0, out1.stderr[-2000:]
    out2 = run_cli(["deepy.py", "--num-procs", "2", "--master-port", str(free_port()), "train.py",
                    write_config(tmp_path / "cp2.yml", cp2)])
    assert out2.returncode == 0, out2.stderr[-2000:]
    assert "dp=1 cp=2" in out2.stdout
    for prefix in ("train", "valid"):
        one, two = read_metrics(tmp_path / "one", prefix), read_metrics(tmp_path / "cp2", prefix)
        assert len(one) == len(two) > 0
        assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (prefix, one, two)

"""NeoX's eval_tasks in a training config: lm-eval through our harness at every eval_interval; the logged
numbers equal eval.py's on the checkpoint saved at that iteration (one process, and TP2 with gloo)."""
import json

import pytest
from conftest import free_port, run_cli, tiny_config_tree, write_config
from eval_helpers import task_data  # noqa: F401  (fixture)

pytest.importorskip("lm_eval")
TASKS = ["docs_lambada", "docs_cloze", "docs_ppl"]


def train_with_eval_tasks(tiny_dataset, task_dir, tmp_path, name, procs=1, **extra):
    run = tmp_path / name
    tree = tiny_config_tree(tiny_dataset, seq_length=64, train_iters=2, eval_interval=2, log_interval=1,
                            save=str(run / "save"), checkpoint_factor=2, log_dir=str(run / "log"),
                            **{"eval-tasks": TASKS, "eval_task_data": str(task_dir), "eval_limit": 3}, **extra)
    cfg = write_config(tmp_path / f"{name}.yml", tree)
    out = run_cli(["deepy.py", "--num-procs", str(procs), "--master-port", str(free_port()), "train.py", cfg])
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(ln) for ln in open(tmp_path / name / "log" / "metrics.jsonl")]
    logged = {k[len("valid/"):]: v for r in records for k, v in r.items()
              if k.startswith("valid/docs_") and r["iteration"] == 2}
    return cfg, out.stdout, logged


def standalone_eval(cfg, task_dir, tmp_path, name) -> dict:
    result = tmp_path / name / "eval.json"
    out = run_cli(["eval.py", cfg, "--load", str(tmp_path / name / "save" / "global_step2"), "--tasks", *TASKS,
                   "--limit", "3", "--task-data", str(task_dir), "--bootstrap-iters", "0", "--no-progress",
                   "--output-path", str(result)], env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(result.read_text())["results"]
    return {f"{task}_{key.split(',')[0]}": value for task, metrics in results.items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@pytest.mark.slow
def test_eval_tasks_during_training_equal_eval_py(tiny_dataset, task_data, tmp_path):  # noqa: F811
    cfg, stdout, logged = train_with_eval_tasks(tiny_dataset, task_data, tmp_path, "one",
                                                tensorboard_dir=str(tmp_path / "one" / "tb"))
    expected = standalone_eval(cfg, task_data, tmp_path, "one")
    assert {"docs_lambada_acc", "docs_cloze_acc", "docs_cloze_acc_norm", "docs_ppl_word_perplexity"} <= set(logged)
    assert logged == expected
    line = [ln for ln in stdout.splitlines() if "| eval tasks |" in ln]
    assert len(line) == 1 and f"docs_cloze_acc {logged['docs_cloze_acc']:.4f}" in line[0]
    from test_neox_logging import tensorboard_scalars

    tags = tensorboard_scalars(tmp_path / "one" / "tb")
    assert tags["validation/docs_ppl_word_perplexity"] == [(2, pytest.approx(logged["docs_ppl_word_perplexity"]))]


@pytest.mark.slow
def test_eval_tasks_under_tensor_parallelism_gather_the_whole_model(tiny_dataset, task_data, tmp_path):  # noqa: F811
    cfg, _, logged = train_with_eval_tasks(tiny_dataset, task_data, tmp_path, "tp2", procs=2, model_parallel_size=2)
    assert logged and logged == standalone_eval(cfg, task_data, tmp_path, "tp2")


def test_eval_tasks_are_checked_and_need_the_evaluator(tiny_dataset, tmp_path):
    from megatron.config import config_from_tree
    from megatron.errors import ConfigError
    from megatron.training.trainer import Trainer

    with pytest.raises(ConfigError, match="eval_tasks run at every eval_interval, which is 0"):
        config_from_tree({"eval_tasks": ["docs_cloze"], "eval_interval": 0}, log=lambda m: None)
    with pytest.raises(ConfigError, match="eval_limit = -1"):
        config_from_tree({"eval_tasks": ["docs_cloze"], "eval_limit": -1}, log=lambda m: None)
    cfg = config_from_tree(tiny_config_tree(tiny_dataset, train_iters=1, eval_tasks=["docs_cloze"]), log=lambda m: None)
    with pytest.raises(ConfigError, match="eval_tasks needs the task evaluator, which train.py attaches"):
        Trainer(cfg, log=lambda m: None).train()

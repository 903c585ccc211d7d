"""eval.py end to end on a tiny checkpoint and the local tasks, deepy's pass-through of script arguments,
and bad input (one clear line, exit code 2, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, TOKENIZER, load_script, run_cli
from eval_helpers import eval_model_tree, save_tiny_checkpoint

pytest.importorskip("lm_eval")


def eval_main():
    return load_script("eval.py").main


def write_yaml(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_local_tasks_end_to_end(eval_checkpoint, task_data, tmp_path):
    """A train-style YAML names the checkpoint and tokenizer, a second one overrides the attention rule."""
    cfg = write_yaml(tmp_path / "eval.yml", {"load": str(eval_checkpoint), "vocab_file": str(TOKENIZER),
                                              "tokenizer_type": "HFTokenizer"})
    full = write_yaml(tmp_path / "full.yml", {"attention": {"sepllm": {"mode": "full"}}})
    out = tmp_path / "res" / "tiny.json"
    proc = run_cli(["eval.py", cfg, full, "--tasks", "docs", "--limit", "4", "--task-data", str(task_data),
                    "--output-path", str(out), "--bootstrap-iters", "0", "--batch-size", "3", "--no-progress"],
                   timeout=300, env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert sorted(results["results"]) == ["docs_cloze", "docs_lambada", "docs_lambada_greedy", "docs_ppl"]
    assert all(r["sample_len"] == 4 for r in results["results"].values())
    cloze = results["results"]["docs_cloze"]
    assert 0.0 <= cloze["acc,none"] <= 1.0 and "acc_norm,none" in cloze
    assert results["results"]["docs_ppl"]["word_perplexity,none"] > 1.0
    assert results["config"]["attention"]["mode"] == "full"
    assert results["config"]["checkpoint"].endswith("global_step1")
    table = out.with_suffix(".md").read_text()
    assert "docs_lambada" in table and "|acc" in table.replace(" ", "")
    assert "docs_cloze" in proc.stdout and f"wrote {out}" in proc.stdout


def test_deepy_passes_script_arguments_through(tmp_path):
    """YAML files stay deepy's; unknown options (with values) and everything after '--' go to the script."""
    cfg = write_yaml(tmp_path / "c.yml", {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4})
    proc = subprocess.run([sys.executable, "deepy.py", "--dry-run", "eval.py", cfg, "--tasks", "docs_lambada",
                           "docs_cloze", "--limit=5", "--num-procs", "1", "--", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.endswith(f"eval.py {cfg} --tasks docs_lambada docs_cloze --limit=5 --device cpu")
    assert "--num-procs" not in command  # deepy's own option, wherever it is


def run_main_capture(argv, capsys):
    code = eval_main()(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("case", ["missing_load", "unknown_checkpoint", "no_tokenizer", "unknown_local_task",
                                  "missing_task_data"])
def test_bad_input_is_one_line(case, eval_checkpoint, task_data, tmp_path, capsys):
    no_tok = eval_model_tree()
    no_tok.pop("vocab_file")
    argv = {
        "missing_load": [write_yaml(tmp_path / "c.yml", {"vocab_file": str(TOKENIZER)}), "--tasks", "docs"],
        "unknown_checkpoint": ["--load", str(tmp_path / "nope"), "--tasks", "docs"],
        "no_tokenizer": ["--load", str(save_tiny_checkpoint(tmp_path / "bare", no_tok)), "--tasks", "docs"],
        "unknown_local_task": ["--load", str(eval_checkpoint), "--tasks", "docs_lambda"],
        "missing_task_data": ["--load", str(eval_checkpoint), "--tasks", "docs_cloze", "--task-data", str(tmp_path)],
    }[case]
    if case != "missing_task_data":
        argv += ["--task-data", str(task_data)]
    expected = {
        "missing_load": "error: no checkpoint to evaluate: set 'load:' in",
        "unknown_checkpoint": "error: unknown checkpoint",
        "no_tokenizer": "error: no tokenizer found for checkpoint",
        "unknown_local_task": "error: unknown local task docs_lambda; did you mean docs_lambada?",
        "missing_task_data": "error: local task docs_cloze: data file",
    }[case]
    code, err = run_main_capture(argv + ["--no-progress"], capsys)
    assert code == 2 and err.startswith(expected) and len(err.splitlines()) == 1, err


def test_bad_input_subprocess_has_no_traceback(task_data, tmp_path):
    proc = run_cli(["eval.py", "--load", str(tmp_path / "nope"), "--tasks", "docs", "--task-data", str(task_data)],
                   timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown checkpoint") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_unknown_standard_task_is_one_line(eval_checkpoint, capsys):
    """A name neither local nor in lm-eval's index (indexing lm-eval's tasks takes seconds)."""
    code, err = run_main_capture(["--load", str(eval_checkpoint), "--tasks", "lambada_opneai"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: unknown task(s) lambada_opneai; did you mean") and "lambada_openai" in err


@pytest.mark.slow
def test_two_ranks_through_deepy_equal_one(eval_checkpoint, task_data, tmp_path):
    """Data parallel: two ranks split the requests and give the numbers of one process; wandb offline."""
    cfg = write_yaml(tmp_path / "eval.yml", {"load": str(eval_checkpoint), "vocab_file": str(TOKENIZER),
                                              "use_wandb": True, "wandb_mode": "offline"})
    common = ["--tasks", "docs_cloze,docs_lambada", "--limit", "6", "--task-data", str(task_data),
              "--bootstrap-iters", "0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"r{procs}" / "res.json"
        proc = subprocess.run([sys.executable, "deepy.py", "--num-procs", str(procs), "eval.py", cfg, *common,
                               "--output-path", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[procs] = json.loads(out.read_text())["results"]
    for task in ("docs_cloze", "docs_lambada"):
        for metric, value in outs[1][task].items():
            if isinstance(value, float):
                assert outs[2][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    assert list((tmp_path / "r1" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_standard_task_without_hub_is_one_line(eval_checkpoint, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "empty_cache"))
    proc = subprocess.run([sys.executable, "eval.py", "--load", str(eval_checkpoint), "--tasks", "lambada_openai",
                           "--limit", "2", "--output-path", str(tmp_path / "r.json")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: task data could not be fetched: Couldn't reach 'EleutherAI/lambada_openai'")

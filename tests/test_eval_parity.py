"""Parity of eval.py with lm-eval's own ``hf`` model on the HF export of the same checkpoint.

The checkpoint is a Sep-Attention model. Its HF export (tools/ckpts/convert_to_hf.py) runs plain full
attention, so parity is checked with ``attention: {sepllm: {mode: full}}`` overriding the rule on our
side: per-example log-likelihoods within 1e-4, identical greedy flags, generations and accuracies.
``long_context: truncate`` makes requests past the training length follow HF's left truncation and
rolling windows. The Sep-Attention parity test runs once the export carries Sep-Attention as remote
code (config.json ``auto_map``, issue 15).
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lm_eval")

TASKS = ["docs_lambada", "docs_cloze", "docs_ppl", "docs_lambada_greedy"]
LIMIT = 6


@pytest.fixture(scope="module")
def hf_export(eval_checkpoint, tmp_path_factory):
    from megatron.convert import export_hf

    out = tmp_path_factory.mktemp("eval_hf") / "hf"
    export_hf(str(eval_checkpoint), str(out), progress=False, log=lambda _: None)
    return out


def run_hf(hf_dir, task_data, trust_remote_code: bool = False):
    import lm_eval

    from megatron.evaluation.local_tasks import make_task_manager, resolve_tasks

    tasks, _ = resolve_tasks(TASKS, task_data)
    args = {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "trust_remote_code": trust_remote_code}
    # The export's bounded SepLLM cache serves one sequence per generate call.
    batch = 1 if trust_remote_code else 4
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, limit=LIMIT, batch_size=batch,
                                   bootstrap_iters=0, log_samples=True, task_manager=make_task_manager(False))


def run_ours(checkpoint, task_data, overrides=None):
    from megatron.evaluation.runner import EvalSettings, evaluate

    settings = EvalSettings(load=str(checkpoint), tasks=TASKS, task_data=str(task_data), limit=LIMIT, batch_size=3,
                            bootstrap_iters=0, log_samples=True, long_context="truncate", progress=False,
                            attention_overrides=overrides or {})
    return evaluate(settings, log=lambda _: None)


def per_example(results, task):
    """Per-example responses: (log-likelihood, greedy) pairs, rolling sums, or generated text."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            out.append(tuple(resp[0]) if isinstance(resp[0], (list, tuple)) else resp[0])
    return out


def assert_same_numbers(ours, theirs):
    for task in TASKS:
        a, b = per_example(ours, task), per_example(theirs, task)
        assert len(a) == len(b) > 0, task
        for x, y in zip(a, b):
            if isinstance(x, tuple):
                assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1], task
            elif isinstance(x, float):
                assert x == pytest.approx(y, abs=1e-4), task
            else:
                assert x == y, task
        for metric, value in theirs["results"][task].items():
            if metric.startswith(("acc", "exact_match")) and "stderr" not in metric:
                assert ours["results"][task][metric] == value, (task, metric)
            elif isinstance(value, float) and "stderr" not in metric:
                assert math.isclose(ours["results"][task][metric], value, rel_tol=1e-4), (task, metric)


def test_full_attention_parity_with_hf_export(eval_checkpoint, hf_export, task_data):
    theirs = run_hf(hf_export, task_data)
    ours = run_ours(eval_checkpoint, task_data, {"attention.sepllm.mode": "full"})
    assert ours["config"]["attention"]["mode"] == "full"
    assert_same_numbers(ours, theirs)
    # The override is what makes them equal: under its own Sep-Attention rule the model scores otherwise.
    sep = run_ours(eval_checkpoint, task_data)
    a, b = per_example(sep, "docs_lambada"), per_example(theirs, "docs_lambada")
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) > 1e-3


def test_sep_attention_parity_with_hf_export(eval_checkpoint, hf_export, task_data):
    assert "auto_map" in json.loads((hf_export / "config.json").read_text())  # the export carries the method
    theirs = run_hf(hf_export, task_data, trust_remote_code=True)
    ours = run_ours(eval_checkpoint, task_data)
    assert ours["config"]["attention"]["mode"] == "sepllm"
    assert_same_numbers(ours, theirs)

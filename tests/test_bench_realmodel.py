"""bench/realmodel.py without the model: its report from a small fixture of results, the window choice and
the StreamingLLM window matched to a KV fraction (the parts a full run depends on, checked in seconds)."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import realmodel  # noqa: E402
import realmodel_report  # noqa: E402

from megatron.attention import SepRule, kv_kept_fraction  # noqa: E402
from megatron.errors import InferenceError  # noqa: E402


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def results(tmp_path):
    sep = {"method": "sepllm n4", "family": "sepllm", "kv_fraction": 0.25, "predictions": 10}
    ppl = [{"method": "full", "family": "full", "kv_fraction": 1.0, "window": 0, "predictions": 10, "nll": 20.0},
           {**sep, "window": 0, "nll": 25.0}, {**sep, "window": 3, "nll": 35.0}]
    write_rows(tmp_path / "ppl.jsonl", ppl)
    write_rows(tmp_path / "stream.jsonl", [
        {"cache": "sepllm a4 s64 w256 c800", "tokens": 4096, "ppl": 21.5, "ppl_cumulative": 22.25, "kv_len": 700,
         "kv_bytes": 3 * 2 ** 20, "rss_mb": 900.4, "peak_rss_mb": 1000.6, "tokens_per_s": 12.34}])
    common = {"heldout_tokens": 256, "heldout_files": ["BSD"], "seq_length": 128, "n_local": 16}
    write_rows(tmp_path / "posttrain.jsonl", [
        {"kind": "eval", "model": "pretrained", "eval_under": "sepllm", "ppl": 30.0, **common},
        {"kind": "eval", "model": "pretrained", "eval_under": "full", "ppl": 20.0, **common},
        {"kind": "train", "arm": "sepllm", "steps": 5, "seq_length": 128, "lr": 2e-4, "train_seconds": 61.2,
         "losses": [3.5, 3.0, 2.25]}])
    write_rows(tmp_path / "generate.jsonl", [
        {"engine": e, "context": 2048, "repeat": i, "decode_tokens_per_s": rate, "kv_entries": kv, "kv_mb": kv / 100,
         "rss_before_decode_mb": 990.2, "peak_rss_mb": 1000 + i}
        for i in range(2) for e, rate, kv in (("ours", 2.0 + i, 476), ("transformers", 1.0, 2056))])
    return tmp_path


def test_report_tables_and_plot(results, tmp_path):
    text = realmodel_report.render(results, tmp_path / "plots")
    sep_ppl = math.exp((25.0 + 35.0) / 20)  # pooled over both windows
    assert f"| sepllm n4 | 0.250 | {sep_ppl:.3f} | {sep_ppl / math.exp(2.0) - 1:+.1%} | 0,3 |" in text
    assert f"| full | 1.000 | {math.exp(2.0):.3f} | +0.0% | 0 |" in text
    assert "| sepllm a4 s64 w256 c800 | 4096 | 21.500 | 22.250 | 700 | 3.0 | 900 | 1001 | 12.3 |" in text
    assert "| pretrained | 30.000 | 20.000 | +50.0% |" in text
    assert "| sepllm | 5 x 128 | 0.0002 | 61 | 3.500 -> 2.250 |" in text
    assert "| 2048 | ours | 2.00 / 3.00 | 2.50 | 476 | 4.8 | 990 | 1001 |" in text
    assert "| 2048 | transformers | 1.00 / 1.00 | 1.00 | 2056 | 20.6 | 990 | 1001 |" in text
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "realmodel_ppl.png"
    assert "realmodel_ppl.png`." in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_plot_or_results_says_so(results, tmp_path):
    text = realmodel_report.render(results, None)
    assert "No plot: matplotlib is not installed (or no ppl results" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = realmodel_report.render(empty, tmp_path / "plots")
    for name in ("ppl", "stream", "posttrain", "generate"):
        assert f"No `{name}` results yet." in text


def test_windows_spread_over_the_text():
    ids = list(range(10 * 8 + 5))
    assert realmodel.choose_windows(ids, None, 8) == list(range(10))
    assert realmodel.choose_windows(ids, 3, 8) == [0, 4, 9]  # round(4.5) is 4
    assert realmodel.choose_windows(ids, 1, 8) == [0]
    assert realmodel.choose_windows(ids, 50, 8) == list(range(10))
    with pytest.raises(InferenceError, match="fewer than one 100-token window"):
        realmodel.choose_windows(ids, 2, 100)


@pytest.mark.parametrize("target", [0.1, 0.2083, 0.355, 0.9])
def test_streaming_window_matches_the_kv_fraction(target):
    length = 300
    flags = torch.zeros(1, length, dtype=torch.bool)
    fractions = {w: kv_kept_fraction(flags, SepRule("streamingllm", realmodel.N_INIT, w)) for w in range(1, length + 1)}
    best = min(abs(f - target) for f in fractions.values())
    w = realmodel.matching_streaming_window(target, length)
    assert abs(fractions[w] - target) == best

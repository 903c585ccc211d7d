"""Progress of long work: totals, percent, rate and ETA on stderr; plain rate-limited lines when not a
terminal, one rewritten line on a terminal; used by preprocessing, conversion, resharding and eval."""
import gzip
import io
import json

import pytest
from conftest import SAMPLE, TOKENIZER

from megatron.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_with_total_rate_and_eta_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    bar = Progress("tokenizing", total=100_000, unit="B", stream=out, interval=10, clock=clock)
    for _ in range(4):  # 5 s per 10 kB: a line at 10 s and at 20 s only
        clock.now += 5
        bar.update(10_000)
    assert out.getvalue().splitlines() == [
        "tokenizing: 20.0 kB / 100.0 kB (20%), 2.0 kB/s, ETA 0:00:40, elapsed 0:00:10",
        "tokenizing: 40.0 kB / 100.0 kB (40%), 2.0 kB/s, ETA 0:00:30, elapsed 0:00:20"]
    clock.now += 30
    bar.update(60_000)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines()[2:] == ["tokenizing: 100.0 kB / 100.0 kB (100%), 2.0 kB/s, elapsed 0:00:50"] * 2


def test_without_total_no_eta_and_every_adds_lines():
    clock, out = Clock(), io.StringIO()
    bar = Progress("tokenizing", unit="docs", stream=out, every=3, clock=clock)
    for _ in range(7):
        clock.now += 1
        bar.update()
    assert out.getvalue().splitlines() == ["tokenizing: 3 docs, 1 docs/s, elapsed 0:00:03",
                                           "tokenizing: 6 docs, 1 docs/s, elapsed 0:00:06"]


def test_a_terminal_gets_one_rewritten_line_and_disabled_gets_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, tty = Clock(), Tty()
    with Progress("layers", total=2, unit="layers", stream=tty, clock=clock) as bar:
        clock.now += 1
        bar.set(1)
    assert tty.getvalue() == ("\r\033[Klayers: 1 layers / 2 layers (50%), 1 layers/s, ETA 0:00:01, elapsed 0:00:01"
                              "\r\033[Klayers: 1 layers / 2 layers (50%), 1 layers/s, ETA 0:00:01, elapsed 0:00:01\n")
    quiet = io.StringIO()
    with Progress("x", total=1, stream=quiet, enabled=False) as bar:
        bar.update(1)
    assert quiet.getvalue() == ""


def test_preprocessing_counts_input_bytes_when_the_size_is_known(tmp_path, capsys):
    from megatron.data.preprocess import PreprocessOptions, preprocess

    lines = (SAMPLE / "corpus.jsonl").read_text().splitlines(keepends=True)[:10]
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(lines))
    preprocess(PreprocessOptions(input=[str(plain)], output_prefix=str(tmp_path / "a"), vocab_file=str(TOKENIZER)))
    size = plain.stat().st_size
    assert f"/ {size / 1000:.1f} kB (100%)" in capsys.readouterr().err
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    preprocess(PreprocessOptions(input=[str(packed)], output_prefix=str(tmp_path / "b"), vocab_file=str(TOKENIZER)))
    err = capsys.readouterr().err
    assert "tokenizing: " in err and "%" not in err and "ETA" not in err  # a compressed input's text size is unknown
    assert json.loads(lines[0])["text"]


def test_reshard_reports_bytes_with_a_total(eval_checkpoint, tmp_path, capsys):
    from megatron.checkpointing.reshard import save_resharded

    save_resharded(str(eval_checkpoint), str(tmp_path / "tp2"), 2, 1, progress=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("resharding: ") and "(100%)" in err[-1]


@pytest.mark.slow  # lm-eval's import and task setup take ~10 s
def test_eval_reports_requests_with_a_total(eval_checkpoint, task_data, tmp_path, capsys, monkeypatch):
    import importlib.util

    import yaml
    from conftest import ROOT

    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    cfg = tmp_path / "eval.yml"
    cfg.write_text(yaml.safe_dump({"load": str(eval_checkpoint), "vocab_file": str(TOKENIZER)}))
    spec = importlib.util.spec_from_file_location("eval_cli_progress", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(cfg), "--tasks", "docs_lambada", "--limit", "4", "--task-data", str(task_data),
                        "--output-path", str(tmp_path / "r.json"), "--bootstrap-iters", "0"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("loglikelihood: 4 requests / 4 requests (100%)") for line in lines), lines[-5:]

"""Bad input to tools/preprocess_data.py: one clear line naming the file, non-zero exit, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "sample" / "tokenizer.json")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def opts(src: Path, tmp_path: Path, **kw) -> PreprocessOptions:
    return PreprocessOptions(input=[str(src)], output_prefix=str(tmp_path / "out"), vocab_file=TOKENIZER,
                             quiet=True, **kw)


@pytest.fixture
def bad_jsonl(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine one."}) + "\n\n" + '{"text": "broken\n'
                    + json.dumps({"text": "ok."}) + "\n")
    return path


def assert_clean_failure(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_malformed_line_cli_names_file_and_line(bad_jsonl, tmp_path):
    res = cli("--input", str(bad_jsonl), "--output-prefix", str(tmp_path / "out"), "--vocab-file", TOKENIZER)
    assert_clean_failure(res, f"{bad_jsonl}:3", "malformed JSON", "--skip-bad-lines")
    assert not list(tmp_path.glob("out*")), "no output (final or temporary) after a failure"


def test_skip_bad_lines_skips_and_counts(bad_jsonl, tmp_path, capsys):
    stats = preprocess(opts(bad_jsonl, tmp_path, skip_bad_lines=True))
    assert (stats.docs, stats.bad_lines) == (2, 1)
    assert f"{bad_jsonl}:3" in capsys.readouterr().err


def test_missing_text_key(tmp_path):
    src = tmp_path / "keys.jsonl"
    src.write_text(json.dumps({"content": "no text key here"}) + "\n")
    with pytest.raises(DataError, match=r"keys\.jsonl:1: JSON object has no key 'text' \(keys: content\)"):
        preprocess(opts(src, tmp_path))
    assert preprocess(opts(src, tmp_path, json_key="content")).docs == 1


def test_non_string_text_and_non_object_lines(tmp_path):
    src = tmp_path / "types.jsonl"
    src.write_text('{"text": 5}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"types\.jsonl:1: value of 'text' is int"):
        preprocess(opts(src, tmp_path))
    with pytest.raises(DataError, match="no documents with text"):
        preprocess(opts(src, tmp_path, skip_bad_lines=True))


def test_empty_file_cli(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n  \n")
    res = cli("--input", str(src), "--output-prefix", str(tmp_path / "out"), "--vocab-file", TOKENIZER)
    assert_clean_failure(res, f"input file '{src}' is empty")


def test_missing_input_and_tokenizer(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        preprocess(opts(tmp_path / "nope.jsonl", tmp_path))
    src = tmp_path / "a.txt"
    src.write_text("text")
    with pytest.raises(DataError, match=r"vocab_file \(tokenizer.json\) '.*missing.json' not found"):
        preprocess(PreprocessOptions(input=[str(src)], output_prefix=str(tmp_path / "o"),
                                     vocab_file=str(tmp_path / "missing.json"), quiet=True))


def test_vocab_too_large_for_uint16_cli(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    src = tmp_path / "doc.txt"
    src.write_text("w1 w2 w3")
    res = cli("--input", str(src), "--output-prefix", str(tmp_path / "out"), "--vocab-file",
              str(tmp_path / "big.json"), "--dtype", "uint16")
    assert_clean_failure(res, "vocabulary of 70002 tokens does not fit dtype uint16")


def test_invalid_utf8_and_corrupt_gzip(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8"):
        preprocess(opts(src, tmp_path))
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"cannot read '.*broken\.jsonl\.gz'"):
        preprocess(opts(gz, tmp_path))
    import gzip
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "a"}\n' * 2000)[:-30] + b"\xff" * 30)
    with pytest.raises(DataError, match=r"cannot read '.*cut\.jsonl\.gz'"):
        preprocess(opts(cut, tmp_path))
    import zstandard
    frame = zstandard.ZstdCompressor().compress(b'{"text": "abc def"}\n' * 5000)
    zst = tmp_path / "broken.jsonl.zst"
    zst.write_bytes(frame[:12] + bytes(b ^ 0x5A for b in frame[12:40]) + frame[40:])
    with pytest.raises(DataError, match=r"cannot read '.*broken\.jsonl\.zst'"):
        preprocess(opts(zst, tmp_path))
    zst.write_bytes(frame + frame[: len(frame) // 2])  # a second frame cut short
    with pytest.raises(DataError, match=r"broken\.jsonl\.zst ends in the middle of a zstd frame"):
        preprocess(opts(zst, tmp_path))

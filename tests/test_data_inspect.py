"""tools/inspect_dataset.py: counts, histogram with decoded text, document and sample decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from megatron.data import IndexedDatasetBuilder
from megatron.errors import run_cli as run_entry_point
from megatron.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"


def load_tool(name: str):
    return load_script(f"tools/{name}.py")


def test_inspect_prints_counts_histogram_and_decodes(tmp_path, capsys):
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    docs = ["The first document, with words.", "A second one; short.", "Third. Third. Third."]
    with IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as builder:
        for d in docs:
            builder.add_document(tok.encode(d) + [tok.eod_id])
    inspect = load_tool("inspect_dataset")
    assert inspect.main([str(tmp_path / "ds"), "--tokenizer", str(TOKENIZER), "--top", "3", "--doc", "1",
                         "--sample", "0", "--seq-length", "4"]) == 0
    out = capsys.readouterr().out
    total = sum(len(tok.encode(d)) + 1 for d in docs)
    assert "documents  3" in out and f"tokens     {total}" in out and "dtype      uint16" in out
    assert "'.'" in out  # the most frequent ids are listed with their text
    assert "--- document 1" in out and "A second one; short.<|endoftext|>" in out
    assert "--- sample 0 (seq_length 4" in out
    with pytest.raises(SystemExit) as exit_code:  # a user error: one line, exit 2 (megatron.errors.run_cli)
        run_entry_point(inspect.main, [str(tmp_path / "ds"), "--doc", "7"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: document 7 out of range: '{tmp_path / 'ds'}' has 3 "
                                               "documents")

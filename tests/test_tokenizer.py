"""Tokenizer loaders (HF tokenizer.json, sentencepiece, GPT-2 vocab/merges), separator ids, vocab padding."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron.errors import DataError
from megatron.tokenizer import build_tokenizer, padded_vocab_size

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SEPARATORS = [".", ",", "?", "!", ";", ":", "\n", " ", "\t"]
TEXT = 'Hello, world.\n\tThe  "assert" statement; is it ok? Yes: done!'


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("\n".join((SAMPLE / "corpus.jsonl").read_text().splitlines()[:60]) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizers_under_test(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train = load_tool("train_tokenizer")
    assert train.main(["--input", str(small_corpus), "--type", "spm", "--vocab-size", "800",
                       "--output", str(out / "spm.model")]) == 0
    from tokenizers import Tokenizer
    Tokenizer.from_file(str(SAMPLE / "tokenizer.json")).model.save(str(out))  # vocab.json + merges.txt
    return {
        "HFTokenizer": build_tokenizer("HFTokenizer", str(SAMPLE / "tokenizer.json")),
        "SPMTokenizer": build_tokenizer("SPMTokenizer", str(out / "spm.model")),
        "GPT2BPETokenizer": build_tokenizer("GPT2BPETokenizer", str(out / "vocab.json"), str(out / "merges.txt")),
    }


@pytest.mark.parametrize("kind", ["HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"])
def test_round_trip_and_eod(tokenizers_under_test, kind):
    tok = tokenizers_under_test[kind]
    ids = tok.encode(TEXT)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert 0 <= tok.eod_id < tok.vocab_size
    assert tok.eod_id not in ids


@pytest.mark.parametrize("kind", ["HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"])
def test_separator_ids_decode_to_the_separators(tokenizers_under_test, kind):
    tok = tokenizers_under_test[kind]
    wanted = set(SEPARATORS) | {" " + s for s in SEPARATORS}
    ids = tok.separator_ids(SEPARATORS)
    anchor = tok.encode("x")
    texts = set()
    for i in ids:
        # Decoded after an anchor so sentencepiece keeps a leading space.
        text = tok.decode(anchor + [i])[len("x"):]
        assert text in wanted, (i, text)
        texts.add(text)
    assert set(SEPARATORS) <= texts  # every single separator exists (byte-level / byte fallback)
    plain = tok.separator_ids(SEPARATORS, include_space_prefixed=False)
    assert set(plain) < set(ids)
    assert {tok.decode(anchor + [i])[1:] for i in plain} == set(SEPARATORS)


def test_byte_level_space_prefixed_separators(tokenizers_under_test):
    tok = tokenizers_under_test["HFTokenizer"]
    single = [i for s in (" .", "\n") for i in [tok.encode(s)] if len(i) == 1]
    assert single and set(i[0] for i in single) <= set(tok.separator_ids(SEPARATORS))
    assert tok.separator_ids(["."], include_space_prefixed=False) == tok.encode(".")


def test_gpt2_files_match_tokenizer_json(tokenizers_under_test):
    hf, gpt2 = tokenizers_under_test["HFTokenizer"], tokenizers_under_test["GPT2BPETokenizer"]
    assert gpt2.encode(TEXT) == hf.encode(TEXT)
    assert gpt2.eod_id == hf.eod_id == 0 and gpt2.vocab_size == hf.vocab_size == 4096


def test_sample_tokenizer_is_gpt_neox_style():
    spec = json.loads((SAMPLE / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["decoder"]["type"] == "ByteLevel"
    assert spec["added_tokens"][0]["content"] == "<|endoftext|>" and spec["added_tokens"][0]["id"] == 0


def test_padded_vocab_size():
    assert padded_vocab_size(4096, 128, 1) == 4096
    assert padded_vocab_size(4097, 128, 1) == 4224
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50277, 128, 2) == 50432
    assert padded_vocab_size(50277, 8, 1) == 50280
    assert padded_vocab_size(100, 1, 1) == 100


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer_type 'BPE'"):
        build_tokenizer("BPE", str(SAMPLE / "tokenizer.json"))
    with pytest.raises(DataError, match=r"'.*nope\.json' not found"):
        build_tokenizer("HFTokenizer", str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="needs a merge_file"):
        build_tokenizer("GPT2BPETokenizer", str(SAMPLE / "tokenizer.json"), None)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="could not be read as a HuggingFace tokenizer.json"):
        build_tokenizer("HFTokenizer", str(tmp_path / "junk.json"))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="sentencepiece model .* could not be loaded"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "junk.model"))


def test_added_literal_tokens_count_as_separators(tmp_path):
    """GPT-NeoX-20B adds runs of spaces as plain (non byte-level) added tokens; they must be found too."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(SAMPLE / "tokenizer.json"))
    tok.add_tokens(["  \t", ";;"])
    tok.save(str(tmp_path / "added.json"))
    loaded = build_tokenizer("HFTokenizer", str(tmp_path / "added.json"))
    new_ids = {loaded.encode("  \t")[0], loaded.encode(";;")[0]}
    assert all(i >= 4096 for i in new_ids)
    found = loaded.separator_ids(["\t", ";;"], include_space_prefixed=False)
    assert loaded.encode(";;")[0] in found and loaded.encode("  \t")[0] not in found
    assert loaded.encode("  \t")[0] in loaded.separator_ids([" \t"])  # ' ' + ' \t'

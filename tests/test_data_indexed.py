"""Indexed dataset: byte layout against the spec, preprocess round trip (uint16 and int32), corruption checks."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from megatron.data import IndexedDatasetBuilder, MMapIndexedDataset
from megatron.errors import DataError
from megatron.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"


def load_tool(name: str):
    return load_script(f"tools/{name}.py")


preprocess_data = load_tool("preprocess_data")


def spec_index_bytes(code: int, itemsize: int, sizes, doc_idx) -> bytes:
    """The .idx format written out field by field from its description."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    pointer = 0
    for s in sizes:
        out += struct.pack("<q", pointer)
        pointer += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def big_vocab_tokenizer(path: Path, size: int = 70000) -> Path:
    """A word-level tokenizer with more ids than uint16 holds; word i is 'w{i}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def run_preprocess(src: Path, prefix: Path, vocab: Path, *extra: str) -> str:
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(prefix), "--vocab-file", str(vocab),
                               "--quiet", *extra])
    assert rc == 0
    return f"{prefix}_text_document"


def test_hand_built_index_is_read(tmp_path):
    sizes, doc_idx = [3, 0, 5, 2], [0, 1, 2, 4]
    tokens = np.arange(10, dtype=np.uint16) + 100
    (tmp_path / "hand.idx").write_bytes(spec_index_bytes(8, 2, sizes, doc_idx))
    (tmp_path / "hand.bin").write_bytes(tokens.astype("<u2").tobytes())
    ds = MMapIndexedDataset(tmp_path / "hand")
    assert len(ds) == 4 and ds.num_documents == 3 and ds.dtype == np.uint16
    assert ds.sizes.tolist() == sizes and ds.doc_idx.tolist() == doc_idx
    assert ds[0].tolist() == [100, 101, 102] and ds[1].tolist() == [] and ds[3].tolist() == [108, 109]
    assert ds.get(2, offset=1, length=3).tolist() == [104, 105, 106]
    assert ds.document(2).tolist() == list(range(103, 110))


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5), (np.uint8, 1)])
def test_builder_output_is_byte_identical_to_spec(tmp_path, dtype, code):
    docs = [[5, 6, 7], [1], [9, 9, 9, 9, 2]]
    with IndexedDatasetBuilder(tmp_path / "built", dtype) as builder:
        for d in docs:
            builder.add_document(d)
    itemsize = np.dtype(dtype).itemsize
    assert (tmp_path / "built.idx").read_bytes() == spec_index_bytes(code, itemsize, [3, 1, 5], [0, 1, 2, 3])
    little_endian = np.dtype(dtype).newbyteorder("<")
    assert (tmp_path / "built.bin").read_bytes() == np.concatenate(docs).astype(little_endian).tobytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_preprocess_round_trip_uint16_and_spec_bytes(tmp_path):
    texts = ["Hello, world. This is one document.", "Second one?\nYes!", "x" * 3000, "Ünïcödé — ok; fine: done."]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    prefix = run_preprocess(src, tmp_path / "out", SAMPLE_TOKENIZER)
    tok = build_tokenizer("HFTokenizer", str(SAMPLE_TOKENIZER))
    expected = [tok.encode(t) + [tok.eod_id] for t in texts]
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert tok.decode(ds[1][:-1].tolist()) == texts[1]
    spec = spec_index_bytes(8, 2, [len(e) for e in expected], list(range(len(texts) + 1)))
    assert Path(prefix + ".idx").read_bytes() == spec


def test_preprocess_round_trip_int32_for_large_vocab(tmp_path):
    vocab = big_vocab_tokenizer(tmp_path / "big.json")
    texts = ["w1 w65535 w69000", "w69997 w2", "w3"]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    prefix = run_preprocess(src, tmp_path / "big", vocab, "--no-append-eod")
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [[3, 65537, 69002], [69999, 4], [5]]
    assert Path(prefix + ".idx").read_bytes()[9 + 8] == 4  # dtype code int32


def test_multiple_workers_compressed_inputs_and_text_files_give_same_tokens(tmp_path):
    import gzip

    import zstandard
    texts = [f"Document {i}: some words, and more words." for i in range(40)]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    one = MMapIndexedDataset(run_preprocess(tmp_path / "a.jsonl.gz", tmp_path / "gz", SAMPLE_TOKENIZER))
    two = MMapIndexedDataset(run_preprocess(tmp_path / "b.jsonl.zst", tmp_path / "zst", SAMPLE_TOKENIZER,
                                            "--workers", "2"))
    txt = MMapIndexedDataset(run_preprocess(tmp_path / "c.txt", tmp_path / "txt", SAMPLE_TOKENIZER,
                                            "--split-lines"))
    assert len(one) == len(two) == len(txt) == 40
    for i in range(40):
        assert one[i].tolist() == two[i].tolist() == txt[i].tolist()


def _make_sample(tmp_path: Path) -> str:
    with IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as builder:
        for n in (10, 20, 30):
            builder.add_document(np.arange(n))
    return str(tmp_path / "ds")


def test_truncated_bin_is_detected_at_open(tmp_path):
    prefix = _make_sample(tmp_path)
    data = Path(prefix + ".bin")
    data.write_bytes(data.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"ds\.bin' is 113 bytes but its index describes 120 bytes.*truncated"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b"NOTMAGIC!" + b[9:], "not a Megatron mmap index"),
    (lambda b: b[:-5], "truncated or corrupted"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:17] + bytes([6]) + b[18:], "float dtype code 6"),
    (lambda b: b[:17] + bytes([42]) + b[18:], "unknown dtype code 42"),
    (lambda b: b[:34 + 12 + 8] + struct.pack("<q", 999) + b[34 + 12 + 16:], "byte pointer of sequence 1"),
    (lambda b: b[:-8] + struct.pack("<q", 7), "document index"),
])
def test_corrupted_idx_is_detected_at_open(tmp_path, corrupt, message):
    prefix = _make_sample(tmp_path)
    index = Path(prefix + ".idx")
    index.write_bytes(corrupt(index.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        MMapIndexedDataset(prefix)
    assert "ds.idx" in str(err.value)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.idx' not found"):
        MMapIndexedDataset(tmp_path / "nothing")
    prefix = _make_sample(tmp_path)
    Path(prefix + ".bin").unlink()
    with pytest.raises(DataError, match=r"ds\.bin' not found"):
        MMapIndexedDataset(prefix)


def test_failed_build_leaves_no_file_under_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "partial", np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("crash mid-build")
    assert list(tmp_path.iterdir()) == []

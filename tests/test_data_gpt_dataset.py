"""GPT samples, splits, epochs, seeds, index caching and blending."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron.data import (
    BlendableDataset,
    GPTDataset,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    build_dataset,
    build_train_valid_test_datasets,
    split_boundaries,
)
from megatron.data.gpt_dataset import document_ranges
from megatron.errors import DataError


def make_dataset(path: Path, doc_lengths, base: int = 0, seed: int = 0) -> str:
    """Documents of the given lengths; token values lie in [base, base + 100) and differ per document."""
    rng = np.random.RandomState(seed)
    with IndexedDatasetBuilder(path, np.uint16) as builder:
        for n in doc_lengths:
            builder.add_document(base + rng.randint(0, 100, size=n))
    return str(path)


def stream_of(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed.get(int(d)) for d in ds.doc_idx]).astype(np.int64)


@pytest.fixture
def corpus(tmp_path) -> str:
    lengths = np.random.RandomState(1).randint(1, 60, size=100).tolist()
    lengths[10] = 0  # an empty document must be skipped cleanly
    return make_dataset(tmp_path / "corpus", lengths)


def test_split_boundaries_exact():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("90,10,0", 174) == [0, 157, 174, 174]
    assert split_boundaries("1,1,1", 10) == [0, 4, 7, 10]  # rounding surplus goes to the earlier splits
    assert split_boundaries("100", 7) == [0, 7, 7, 7]
    assert split_boundaries("0.8/0.2", 5) == [0, 4, 5, 5]
    for bad in ("", "a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(DataError, match="split"):
            split_boundaries(bad, 10)


def test_split_documents_are_disjoint_and_cover_all(corpus, tmp_path):
    ds = MMapIndexedDataset(corpus)
    train, valid, test = document_ranges(ds, "80,15,5")
    assert (train[0], train[-1], valid[0], valid[-1], test[0], test[-1]) == (0, 79, 80, 94, 95, 99)
    tr, va, te = build_train_valid_test_datasets([corpus], None, "80,15,5", 16, 3, (50, 10, 5),
                                                 cache_dir=str(tmp_path / "cache"))
    assert set(tr.doc_idx.tolist()) == set(range(0, 80))
    assert set(va.doc_idx.tolist()) == set(range(80, 95))
    assert set(te.doc_idx.tolist()) == set(range(95, 100))
    _, none_valid, none_test = build_train_valid_test_datasets([corpus], None, "1,0,0", 16, 3, (50, 10, 5),
                                                               cache_dir=str(tmp_path / "cache"))
    assert none_valid is None and none_test is None


def test_samples_are_consecutive_windows_of_the_shuffled_stream(corpus, tmp_path):
    ds = build_dataset([corpus], None, seq_length=16, seed=5, num_samples=40, cache_dir=str(tmp_path / "c"))
    stream = stream_of(ds)
    assert len(ds) >= 40
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]["text"]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(sample, stream[j * 16: j * 16 + 17])
        seen.add(j)
    assert seen == set(range(len(ds)))  # shuffle is a permutation


def test_more_samples_than_one_epoch_uses_more_epochs(corpus, tmp_path):
    tokens = MMapIndexedDataset(corpus).num_tokens
    wanted = (3 * tokens - 1) // 16 + 1  # one more sample than three epochs hold
    ds = build_dataset([corpus], None, seq_length=16, seed=5, num_samples=wanted, cache_dir=str(tmp_path / "c"))
    assert len(ds) >= wanted
    counts = np.bincount(ds.doc_idx, minlength=100)
    assert (counts == 4).all()  # four epochs, each document once per epoch
    assert all(ds[i]["text"].shape == (17,) for i in range(0, len(ds), 7))


def test_order_is_deterministic_by_seed_and_cached(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = build_dataset([corpus], None, 16, seed=11, num_samples=60, cache_dir=str(cache))
    files = sorted(cache.iterdir())
    assert len(files) == 3 and not any(".tmp" in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = build_dataset([corpus], None, 16, seed=11, num_samples=60, cache_dir=str(cache))
    assert [f.stat().st_mtime_ns for f in sorted(cache.iterdir())] == mtimes  # loaded, not rebuilt
    fresh = build_dataset([corpus], None, 16, seed=11, num_samples=60, cache_dir=str(tmp_path / "other"))
    other_seed = build_dataset([corpus], None, 16, seed=12, num_samples=60, cache_dir=str(cache))
    take = lambda d: np.stack([d[i]["text"] for i in range(60)])  # noqa: E731
    np.testing.assert_array_equal(take(first), take(again))
    np.testing.assert_array_equal(take(first), take(fresh))
    assert not np.array_equal(take(first), take(other_seed))
    assert sorted(map(tuple, take(first))) == sorted(map(tuple, take(fresh)))


def test_cache_defaults_to_next_to_the_data(corpus):
    build_dataset([corpus], None, 8, seed=1, num_samples=5)
    assert len(list(Path(corpus).parent.glob("corpus_all_5ns_8sl_1s_*_shuffle_idx.npy"))) == 1


def test_blend_weights_within_one_percent(tmp_path):
    prefixes = [make_dataset(tmp_path / f"d{k}", [40] * (20 + 30 * k), base=100 * k, seed=k) for k in range(3)]
    weights = [0.5, 0.3, 0.2]
    blend = build_dataset(prefixes, weights, seq_length=8, seed=2, num_samples=10_000,
                          cache_dir=str(tmp_path / "cache"))
    assert isinstance(blend, BlendableDataset) and len(blend) == 10_000
    source = np.array([int(blend[i]["text"][0]) // 100 for i in range(10_000)])
    shares = np.bincount(source, minlength=3) / 10_000
    assert np.abs(shares - weights).max() < 0.01
    again = build_dataset(prefixes, weights, seq_length=8, seed=2, num_samples=10_000,
                          cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.dataset_index, blend.dataset_index)
    assert all(np.array_equal(again[i]["text"], blend[i]["text"]) for i in range(0, 10_000, 97))


def test_blended_train_valid_test(tmp_path):
    a = make_dataset(tmp_path / "a", [30] * 50, base=0)
    b = make_dataset(tmp_path / "b", [30] * 50, base=100, seed=3)
    tr, va, te = build_train_valid_test_datasets([a, b], [1, 3], "90,10,0", 8, 4, (2000, 400, 0),
                                                 cache_dir=str(tmp_path / "cache"))
    assert te is None and len(tr) == 2000 and len(va) == 400
    share_b = np.mean([tr[i]["text"][0] >= 100 for i in range(2000)])
    assert abs(share_b - 0.75) < 0.01


def test_argument_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="2 weights given for 1 data prefixes"):
        build_dataset([corpus], [1, 2], 8, 1, 10, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="no data prefixes"):
        build_dataset([], None, 8, 1, 10)
    with pytest.raises(DataError, match=r"missing\.idx' not found"):
        build_train_valid_test_datasets([str(tmp_path / "missing")], None, "1,0,0", 8, 1, (1, 0, 0))


def test_partial_last_epoch_is_shuffled_separately(corpus, tmp_path):
    tokens = MMapIndexedDataset(corpus).num_tokens
    one_epoch = (tokens - 1) // 16
    ds = build_dataset([corpus], None, 16, seed=9, num_samples=one_epoch + 2, cache_dir=str(tmp_path / "c"))
    assert sorted(ds.doc_idx[:100].tolist()) == list(range(100))  # epoch 1 alone, then epoch 2 alone
    assert sorted(ds.doc_idx[100:].tolist()) == list(range(100))
    assert set(ds.shuffle_idx[:one_epoch].tolist()) == set(range(one_epoch))
    mixed = build_dataset([corpus], None, 16, seed=9, num_samples=2 * one_epoch - 1, cache_dir=str(tmp_path / "c"))
    assert sorted(mixed.doc_idx[:100].tolist()) != list(range(100))  # a mostly used last epoch is mixed in

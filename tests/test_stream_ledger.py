"""The one per-entry ledger both streaming caches keep (megatron/hf_remote/stream_ledger.py)."""
import torch

from megatron.hf_remote.sepllm_cache import BatchStreamLedger
from megatron.hf_remote.stream_ledger import StreamLedger
from megatron.inference.kv_cache import StreamingKVCache


def ledger_with(n: int) -> StreamLedger:
    ledger = StreamLedger(2, "cpu", {"positions": torch.long, "is_sep": torch.bool}, capacity=3)
    pos = torch.arange(n)[None].repeat(2, 1)
    pos[1] += 100
    ledger.append({"positions": pos, "is_sep": pos % 3 == 0})
    return ledger


def test_append_grows_and_reads_back_what_was_held():
    ledger = ledger_with(5)
    assert ledger.capacity >= 5 and ledger.length == 5
    assert ledger.positions.tolist() == [[0, 1, 2, 3, 4], [100, 101, 102, 103, 104]]
    assert ledger.is_sep[0].tolist() == [True, False, False, True, False]


def test_retain_by_gather_and_by_dropping_a_range_agree():
    gathered, moved = ledger_with(8), ledger_with(8)
    keep = torch.tensor([0, 1, 5, 6, 7])
    gathered.retain(keep)
    moved.retain(keep, drop=(2, 5))
    for ledger in (gathered, moved):
        assert ledger.positions[0].tolist() == [0, 1, 5, 6, 7] and ledger.length == 5
    assert torch.equal(gathered.is_sep, moved.is_sep)


def test_rows_reorder_with_the_batch_counters():
    ledger = BatchStreamLedger(2, torch.device("cpu"))
    entries = {name: torch.zeros(2, 3, dtype=torch.bool if name in ("is_sep", "valid") else torch.long)
               for name in BatchStreamLedger.FIELDS}
    entries["positions"] = torch.tensor([[0, 1, 2], [7, 8, 9]])
    ledger.append(entries, (torch.tensor([3, 10]), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
    ledger.select_rows(torch.tensor([1, 1, 0]))
    assert ledger.positions.tolist() == [[7, 8, 9], [7, 8, 9], [0, 1, 2]] and ledger.seen.tolist() == [10, 10, 3]


def test_the_engine_cache_keeps_its_bookkeeping_in_the_ledger():
    from megatron.inference.kv_cache import CacheConfig

    cache = StreamingKVCache(CacheConfig("streamingllm", 2, 0, 2, 6), [0], 1, 2, rotary=False)
    for start in range(0, 10, 2):
        cache.make_room(2)
        for layer in cache.layer_ids:
            cache.write(layer, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))
        cache.commit(torch.arange(start, start + 2), torch.arange(start, start + 2), torch.zeros(2, dtype=torch.bool))
    assert cache.kept_positions() == cache.ledger.positions[0].tolist() == [0, 1, 6, 7, 8, 9]
    assert cache.length == cache.ledger.length == 6

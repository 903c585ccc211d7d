"""``enable_sepllm`` on stock transformers models (training-free SepLLM) and the SepLLMCache:
Sep-Attention logits equal our model's, the bounded cache stays bounded, padded batches and beam
search under the exact rule, and one clear error for every unsupported input."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import TOKENIZER
from test_hf_common import VOCAB, randomize, tiny_falcon, tiny_gpt2, tiny_llama, tiny_neox, transformers

from megatron.attention.sepllm_rule import SepRule, document_ids, positions_in_document, separator_flags
from megatron.hf_remote import enable_sepllm, separator_ids_from_tokenizer
from megatron.hf_remote.sepllm_attach import SepLLMConfigError
from megatron.tokenizer import build_tokenizer

SEPS = [3, 7, 11]
BUDGET = dict(init_cache_size=2, sep_cache_size=4, local_size=8, cache_size=24)


def stream(n: int, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(12, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    tokens[:, 4::5] = SEPS[1]
    return tokens


def sep_model(builder=tiny_llama, **overrides):
    model = randomize(builder(**overrides))
    return enable_sepllm(model, n_init=2, n_local=6, separator_ids=SEPS, cache=BUDGET)


def greedy(model, prompt, steps, **kw):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[:, prompt.shape[1]:]


def test_bounded_cache_stays_within_budget_and_allocates_once():
    model = sep_model()
    cache = model.sepllm_cache()
    seen = []

    def record(input_ids, scores, **kwargs):
        seen.append((cache.length, cache.allocated_bytes(), cache.region_sizes()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    greedy(model, stream(12), 200, past_key_values=cache,
           stopping_criteria=transformers.StoppingCriteriaList([record]))
    assert len(seen) == 200 and cache.layers[0].get_seq_length() == 211  # what generate counts
    assert max(length for length, _, _ in seen) <= 24 and cache.compressions > 10
    assert len({allocated for _, allocated, _ in seen}) == 1  # preallocated to the budget, never regrown
    for length, _, regions in seen:
        assert sum(regions.values()) == length and regions["separators"] <= 4 and regions["initial"] == 2
    full = model.sepllm_cache(policy="full")
    greedy(model, stream(12), 30, past_key_values=full)
    assert full.length == 41 and full.layers[0].keys.shape[-2] >= 41  # the unbounded baseline grows


def test_default_generate_uses_the_configured_bounded_cache():
    model = sep_model()
    prompt = stream(30)  # longer than the 10 tokens one forward may append: prefilled in chunks
    explicit = greedy(model, prompt, 40, past_key_values=model.sepllm_cache())
    assert torch.equal(greedy(model, prompt, 40), explicit)
    no_cache = greedy(model, prompt, 40, use_cache=False)  # every step recomputes the exact rule
    rule_cache = greedy(model, prompt, 40, past_key_values=model.sepllm_cache(policy="full", decode_mask="rule"))
    assert torch.equal(rule_cache, no_cache)


@pytest.mark.parametrize("builder", [tiny_neox, tiny_llama, tiny_gpt2, tiny_falcon])
def test_padded_batch_equals_each_row_alone(builder):
    model = sep_model(builder)
    rows = [stream(9, seed=1)[0], stream(14, seed=2)[0]]
    batch = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding
        batch[i, 14 - len(row):], mask[i, 14 - len(row):] = row, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(padded[i, 14 - len(row):], alone, atol=1e-5, rtol=0)
    cache = model.sepllm_cache(policy="full", decode_mask="rule")
    out = greedy(model, batch, 8, attention_mask=mask, past_key_values=cache)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], greedy(model, row[None], 8, use_cache=False)[0])


@pytest.mark.parametrize("rule", [dict(separate_documents=True, eod_id=0), dict(mode="fixed_interval", interval=3),
                                  dict(full_attention_layers=[0], layer_n_local={1: 3})])
def test_chunked_forwards_through_the_cache_equal_one_forward(rule):
    """The cache's bookkeeping (stream positions, documents, separator flags) continues across forwards."""
    model = enable_sepllm(randomize(tiny_llama()), n_init=2, n_local=4, separator_ids=SEPS, **rule)
    tokens = stream(23)
    tokens[0, [6, 15]] = 0  # end-of-document tokens
    cache = model.sepllm_cache(policy="full", decode_mask="rule")
    with torch.no_grad():
        whole = model(tokens, use_cache=False).logits
        pieces = [model(tokens[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 14), (14, 23))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)
    ledger = cache.ledger  # per entry, what the rule's own helpers say about the whole sequence
    docs = document_ids(tokens, 0) if "eod_id" in rule else torch.zeros_like(tokens)
    assert torch.equal(ledger.positions, torch.arange(23)[None]) and torch.equal(ledger.doc_ids, docs)
    assert torch.equal(ledger.pos_in_doc, positions_in_document(docs))
    base = SepRule(rule.get("mode", "sepllm"), interval=rule.get("interval", 5))
    assert torch.equal(ledger.is_sep, separator_flags(tokens, base, torch.tensor(SEPS)))


def test_beam_search_reorders_the_cache_bookkeeping():
    model = sep_model()
    prompt = stream(10)
    cached = greedy(model, prompt, 12, num_beams=3, past_key_values=model.sepllm_cache(policy="full",
                                                                                       decode_mask="rule"))
    assert torch.equal(cached, greedy(model, prompt, 12, num_beams=3, use_cache=False))


def test_separators_from_a_transformers_tokenizer_match_ours():
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    ours = build_tokenizer("HFTokenizer", str(TOKENIZER), None)
    strings = [".", ",", "?", "!", ";", ":", " ", "\t", "\n"]
    found = separator_ids_from_tokenizer(hf_tok, strings)
    assert found == ours.separator_ids(strings, True) and len(found) > 9


def test_setting_errors_are_one_clear_line():
    with pytest.raises(SepLLMConfigError, match="needs separator_ids=\\[...\\] or tokenizer="):
        enable_sepllm(randomize(tiny_llama()))
    with pytest.raises(SepLLMConfigError, match="n_local >= 1"):
        enable_sepllm(randomize(tiny_llama()), n_local=0, separator_ids=SEPS)
    with pytest.raises(SepLLMConfigError, match="init_cache_size \\+ sep_cache_size \\+ local_size < cache_size"):
        enable_sepllm(randomize(tiny_llama()), separator_ids=SEPS, cache=dict(cache_size=300))
    with pytest.raises(SepLLMConfigError, match="this Falcon uses ALiBi"):
        enable_sepllm(randomize(tiny_falcon(alibi=True)), separator_ids=SEPS)
    with pytest.raises(SepLLMConfigError, match="separate_documents needs eod_id"):
        enable_sepllm(randomize(tiny_llama()), separator_ids=SEPS, separate_documents=True)
    with pytest.raises(SepLLMConfigError, match="SepLLM supports model types"):
        enable_sepllm(transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)),
            separator_ids=SEPS)


def test_input_errors_are_one_clear_line():
    model = sep_model()
    with torch.no_grad():
        with pytest.raises(ValueError, match="serves one sequence at a time"):
            greedy(model, torch.cat([stream(6), stream(6, seed=1)]), 2)
        with pytest.raises(ValueError, match="at most 10 fit this cache budget .*prefill_chunk_size"):
            model(stream(12), cache=model.sepllm_cache())
        with pytest.raises(ValueError, match="cannot hold padding"):
            greedy(model, stream(6), 2, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
        with pytest.raises(ValueError, match="needs a SepLLMCache"):
            model(stream(4), cache=transformers.DynamicCache(ddp_cache_data=[
                (torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))] * 2))
        with pytest.raises(ValueError, match="finds separators in input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 32))
        gpt2 = sep_model(tiny_gpt2)
        with pytest.raises(ValueError, match="position 64 is beyond the 64 learned positions"):
            greedy(gpt2, stream(60), 8, use_cache=False)
        model.config._attn_implementation = "flex_attention"
        with pytest.raises(ValueError, match="SepLLM runs on attn_implementation"):
            model(stream(4))


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)  # 20,000 generate steps: close to 10 minutes on a loaded 2-core box
def test_streaming_20k_tokens_in_transformers_keeps_memory_flat():
    """20,000 generated tokens through model.generate with the default budget a4 s64 w256 c800. A cache
    that kept everything would hold 20,000 x 2 layers x K and V x 256 floats = 78 MiB at the end."""
    model = randomize(tiny_llama(hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                                 intermediate_size=256))
    enable_sepllm(model, n_init=4, n_local=256, separator_ids=SEPS)
    cache = model.sepllm_cache()
    marks = {}

    def record(input_ids, scores, **kwargs):
        if input_ids.shape[1] % 2000 == 0:
            marks[input_ids.shape[1]] = (rss_mib(), cache.length, cache.allocated_bytes())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    greedy(model, stream(16), 20_000 - 16, past_key_values=cache,
           stopping_criteria=transformers.StoppingCriteriaList([record]))
    assert sorted(marks) == list(range(2000, 20_001, 2000))
    assert all(length <= 800 for _, length, _ in marks.values()) and cache.compressions > 40
    assert len({allocated for _, _, allocated in marks.values()}) == 1
    growth = marks[20_000][0] - marks[2000][0]
    assert growth < 16, f"resident memory grew {growth:.1f} MiB from token 2,000 to 20,000"

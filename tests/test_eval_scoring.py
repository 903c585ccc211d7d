"""The evaluation scorer and lm-eval wrapper against direct computations on a tiny model: log-likelihoods
vs a plain forward pass, batched vs one at a time (padding never seen), rolling log-likelihood vs our
perplexity (training loss within the length, the streaming perplexity tool past it), generation vs a
greedy loop over full forwards, and one TP2 x PP2 checkpoint vs its TP1 original."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER
from eval_helpers import VOCAB, eval_model_tree, make_model

from megatron.errors import InferenceError
from megatron.evaluation.scoring import Scorer, stream_cache_for
from megatron.inference import StreamingEngine
from megatron.inference.streaming_eval import evaluate_stream
from megatron.tokenizer import build_tokenizer


def random_requests(seed: int, count: int, max_total: int, sep_ids=(), vocab: int = VOCAB):
    """(context, continuation) pairs of varied lengths; some tokens are separators so the rule bites."""
    rng = random.Random(seed)
    pool = list(range(2, vocab)) + list(sep_ids) * 200
    out = []
    for _ in range(count):
        total = rng.randint(3, max_total)
        cont = rng.randint(1, min(6, total - 1))
        ids = [rng.choice(pool) for _ in range(total)]
        out.append((ids[:total - cont], ids[total - cont:]))
    return out


def direct_loglikelihood(model, ctx, cont):
    """Sum of log p(cont | ctx) and greedy flag from one unpadded forward of the whole sequence."""
    tokens = torch.tensor([list(ctx) + list(cont)])
    logp = F.log_softmax(model.full_logits(tokens)[0, :-1, :VOCAB].double(), dim=-1)
    rows = logp[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("impl", ["reference", "compact"])
def test_loglikelihoods_equal_a_direct_forward(impl):
    model = make_model(eval_model_tree(attention={"impl": impl}))
    reqs = random_requests(0, 12, 64, model.separator_ids.tolist())
    got = Scorer(model, VOCAB, 64, batch_size=5).loglikelihoods(reqs)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        want_lp, want_greedy = direct_loglikelihood(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    # Greedy flag is informative: the model's own argmax continuation is greedy, a random one is not.
    ctx = reqs[0][0]
    best = int(model.full_logits(torch.tensor([ctx]))[0, -1, :VOCAB].argmax())
    assert Scorer(model, VOCAB, 64).loglikelihoods([(ctx, [best])])[0][1] is True


@pytest.mark.parametrize("attention", [
    {"sepllm": {"mode": "sepllm"}},
    {"sepllm": {"mode": "streamingllm"}},
    {"sepllm": {"mode": "fixed_interval", "interval": 3}},
    {"sepllm": {"mode": "full"}},
    {"sepllm": {"mode": "sepllm", "separate_documents": True}},
    {"impl": "compact", "sepllm": {"mode": "sepllm", "full_attention_layers": [0]}},
])
def test_batched_equals_one_at_a_time_padding_unseen(attention):
    model = make_model(eval_model_tree(attention=attention))
    seps = model.separator_ids.tolist()
    reqs = random_requests(1, 10, 64, seps)
    one = Scorer(model, VOCAB, 64, batch_size=1).loglikelihoods(reqs)
    # Pad with a separator and with the EOD id: if padding were ever a visible key, these would differ.
    for pad in (seps[0], 0):
        batched = Scorer(model, VOCAB, 64, pad_id=pad, batch_size=4).loglikelihoods(reqs)
        for (a, ga), (b, gb) in zip(one, batched):
            assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_left_padding_would_be_seen():
    """The check above can fail: the same request with pads in front scores differently."""
    model = make_model(eval_model_tree())
    ctx, cont = random_requests(2, 1, 30, model.separator_ids.tolist())[0]
    sep = int(model.separator_ids[0])
    padded, _ = direct_loglikelihood(model, [sep] * 7 + list(ctx), cont)
    plain, _ = direct_loglikelihood(model, ctx, cont)
    assert abs(padded - plain) > 1e-3


def test_rolling_equals_training_loss_within_the_length(eval_checkpoint):
    """loglikelihood_rolling of a text = -(our per-token loss x tokens) over [EOD] + its tokens."""
    pytest.importorskip("lm_eval")
    from megatron.evaluation.runner import EvalSettings, make_lm

    lm, _ = make_lm(EvalSettings(load=str(eval_checkpoint), tasks=["docs"], progress=False))
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    text = "The assert statement is a convenient way to insert debugging assertions into a program."
    ids = [tok.eod_id] + tok.encode(text)
    inputs, labels = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        loss = float(lm.scorer.model(inputs, labels=labels))  # mean cross-entropy, as training reports it

    class Req:
        args = (text,)

    assert lm.loglikelihood_rolling([Req()])[0] == pytest.approx(-loss * (len(ids) - 1), rel=1e-5)


def test_rolling_past_the_length_equals_streaming_perplexity(eval_checkpoint):
    """Past max_length the stream goes through the bounded cache, and equals the streaming perplexity
    tool's token-by-token result (same cache, same tokens) although it feeds many tokens per forward."""
    pytest.importorskip("lm_eval")
    from megatron.evaluation.runner import EvalSettings, make_lm

    lm, info = make_lm(EvalSettings(load=str(eval_checkpoint), tasks=["docs"], max_length=24, progress=False))
    assert info["stream_cache"]["policy"] == "sepllm" and info["stream_cache"]["cache_size"] == 24
    tok = build_tokenizer("HFTokenizer", str(TOKENIZER))
    text = open(TOKENIZER.parent / "corpus.jsonl").read()[:1200]
    ids = tok.encode(text)
    assert len(ids) > 4 * 24

    class Req:
        args = (text,)

    ours = lm.loglikelihood_rolling([Req()])[0]
    engine = StreamingEngine(lm.scorer.model, lm.scorer.stream_cache)
    reports = evaluate_stream(engine, [tok.eod_id] + ids, report_every=len(ids))
    assert engine.cache.compressions > 2
    assert ours == pytest.approx(-math.log(reports[-1].ppl_cumulative) * len(ids), rel=1e-5)
    # The cache was used: a plain forward over the whole text would give another number.
    plain = Scorer(lm.scorer.model, VOCAB, len(ids) + 1).loglikelihoods([([tok.eod_id], ids)])[0][0]
    assert abs(plain - ours) > 1e-2


def test_generation_equals_greedy_full_forwards():
    model = make_model(eval_model_tree())
    scorer = Scorer(model, VOCAB, 64)
    ctx = random_requests(3, 1, 20, model.separator_ids.tolist())[0][0]
    got = scorer.generate(ctx, 12, lambda ids: False)
    seq = list(ctx)
    for _ in range(12):
        seq.append(int(model.full_logits(torch.tensor([seq]))[0, -1, :VOCAB].argmax()))
    assert got == seq[len(ctx):]
    stop_at = got[3]
    assert scorer.generate(ctx, 12, lambda ids: False, stop_ids=[stop_at]) == got[:got.index(stop_at)]
    assert scorer.generate(ctx, 12, lambda ids: len(ids) == 5) == got[:5]


def test_stream_cache_follows_the_rule_and_bad_settings():
    for mode, policy in (("sepllm", "sepllm"), ("fixed_interval", "sepllm"), ("streamingllm", "streamingllm"),
                         ("full", "streamingllm")):
        cache = stream_cache_for(make_model(eval_model_tree(mode)), 64)
        assert cache.policy == policy and cache.cache_size == 64
        assert cache.decode_mask == ("cache" if mode == "full" else "rule")
    with pytest.raises(InferenceError, match="leaves no room"):
        stream_cache_for(make_model(eval_model_tree()), 10)
    with pytest.raises(InferenceError, match="long_context must be one of"):
        Scorer(make_model(eval_model_tree()), VOCAB, 64, long_context="chop")
    truncating = Scorer(make_model(eval_model_tree()), VOCAB, 8, long_context="truncate")
    with pytest.raises(InferenceError, match="continuation of 9 tokens does not fit max_length 8"):
        truncating.loglikelihoods([([5, 6], [7] * 9)])
    with pytest.raises(InferenceError, match="must both be non-empty"):
        truncating.loglikelihoods([([], [7])])


def test_sharded_checkpoint_scores_like_the_original(eval_checkpoint, tmp_path):
    """A TP2 x PP2 copy of the checkpoint (resharded offline) is merged on load and scores the same."""
    pytest.importorskip("lm_eval")
    from megatron.checkpointing.reshard import save_resharded
    from megatron.evaluation.runner import EvalSettings, make_lm

    save_resharded(str(eval_checkpoint / "global_step1"), str(tmp_path / "tp2pp2"), tp=2, pp=2, weights_only=True)
    reqs = random_requests(4, 6, 64)
    scores = []
    for load in (eval_checkpoint, tmp_path / "tp2pp2"):
        lm, _ = make_lm(EvalSettings(load=str(load), tasks=["docs"], progress=False))
        scores.append(lm.scorer.loglikelihoods(reqs))
    for (a, ga), (b, gb) in zip(*scores):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb

"""Token-level scoring and generation with a GPTModel under its own attention rule (no lm-eval here).

* Requests that fit the model's length (``len(context + continuation) - 1 <= max_length``) are sorted
  by length, grouped into batches and right-padded; one forward of the whole model per batch, with
  the Sep-Attention rule the model was built with.
* Longer requests go token stream by token stream through the bounded Streaming-SepLLM KV cache
  (``StreamingEngine``), whose positions stay below the cache budget (``long_context="stream"``), or
  are cut from the left to ``max_length`` tokens as lm-eval's ``hf`` model does (``"truncate"``).

Right padding is safe under every mode of the rule: key ``j`` is visible to query ``i`` only if
``j <= i`` (the rule's first clause), and pads sit after every real token of their row, so no pad
is ever a key of a real query. Separator flags, document ids and fixed-interval flags are computed
left to right, so pads cannot change them for real tokens either; and the loss reads only real
positions. (Left padding would not be safe: it shifts positions and turns pads into the "initial"
tokens every query sees.)

Log-probabilities are taken over the real vocabulary (``vocab_limit``): the padded rows of the
embedding are not tokens, and an HF export does not have them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron.errors import InferenceError
from megatron.inference.engine import StreamingEngine
from megatron.inference.kv_cache import CacheConfig
from megatron.inference.sampling import SamplingConfig, make_generator, sample_next_token
from megatron.model.gpt import GPTModel

LONG_CONTEXT = ("stream", "truncate")
Request = Tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def stream_cache_for(model: GPTModel, max_length: int) -> CacheConfig:
    """The bounded KV cache that follows the model's own rule, with a budget of ``max_length`` entries
    (the training length by default, so positions under positional shift stay within what was trained).

    sepllm / fixed_interval: the SepLLM cache with a = n_init, w = the widest local window, and the
    rest split between separators and room for new tokens; streamingllm: initial + most recent; both
    with the rule applied inside the cache. Full attention: StreamingLLM's attention sinks (4 initial
    tokens + the most recent), the standard way past a full-attention model's length.
    """
    rule = model.base_rule
    decode_mask = "cache" if rule.separate_documents else "rule"
    if rule.mode == "full":
        return CacheConfig("streamingllm", min(4, max_length - 1), 0, 0, max_length, True, "cache")
    a = rule.n_init
    if rule.mode == "streamingllm":
        return CacheConfig("streamingllm", a, 0, 0, max_length, True, decode_mask)
    w = max(r.n_local for r in model.rules if not r.is_full)
    spare = max_length - a - w
    if spare < 2:
        raise InferenceError(f"the training length {max_length} leaves no room for a SepLLM cache with "
                             f"n_init {a} and n_local {w}; use long_context 'truncate' or a larger max_length")
    return CacheConfig("sepllm", a, spare // 2, w, max_length, True, decode_mask)


@dataclass
class Scorer:
    """Log-likelihoods and generations of token sequences with ``model`` (eval mode, one device)."""

    model: GPTModel
    vocab_limit: int  # real vocabulary size; rows above it are padding
    max_length: int
    pad_id: int = 0
    batch_size: int = 8
    long_context: str = "stream"
    stream_cache: Optional[CacheConfig] = None  # default: stream_cache_for(model, max_length), when needed

    def __post_init__(self):
        if self.long_context not in LONG_CONTEXT:
            raise InferenceError(f"long_context must be one of {LONG_CONTEXT}, got {self.long_context!r}")
        if self.batch_size < 1 or self.max_length < 2:
            raise InferenceError(f"batch_size must be >= 1 and max_length >= 2; got {self.batch_size}, "
                                 f"{self.max_length}")
        self.device = self.model.output_weight.device
        self._engine: Optional[StreamingEngine] = None

    # ------------------------------------------------------------------ log-likelihoods
    def fits(self, context: Sequence[int], continuation: Sequence[int]) -> bool:
        return len(context) + len(continuation) - 1 <= self.max_length

    def loglikelihoods(self, requests: Sequence[Request],
                       on_done: Optional[Callable[[int], None]] = None) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per
        request, in request order. ``on_done(n)`` is called as requests complete (progress bars)."""
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise InferenceError(f"request {i}: context and continuation must both be non-empty")
            if self.long_context == "truncate" and len(cont) > self.max_length:
                raise InferenceError(f"request {i}: a continuation of {len(cont)} tokens does not fit max_length "
                                     f"{self.max_length} (long_context 'truncate'); use 'stream'")
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        short = [i for i, (c, x) in enumerate(requests) if self.fits(c, x) or self.long_context == "truncate"]
        long = sorted(set(range(len(requests))) - set(short))
        # Longest first (as lm-eval does): the first batch shows the memory peak at once.
        short.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        for start in range(0, len(short), self.batch_size):
            batch = short[start:start + self.batch_size]
            for i, res in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[i] = res
            if on_done:
                on_done(len(batch))
        for i in long:
            results[i] = self._score_streaming(*requests[i])
            if on_done:
                on_done(1)
        return results  # type: ignore[return-value]

    def _model_input(self, ctx: Sequence[int], cont: Sequence[int]) -> List[int]:
        whole = list(ctx) + list(cont)
        return whole[-(self.max_length + 1):][:-1]  # a no-op cut unless truncating

    @torch.no_grad()
    def _score_batch(self, batch: Sequence[Request]) -> List[Tuple[float, bool]]:
        inputs = [self._model_input(c, x) for c, x in batch]
        width = max(len(t) for t in inputs)
        tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = self.model.full_logits(tokens.to(self.device))
        out = []
        for row, ((_, cont), ids) in enumerate(zip(batch, inputs)):
            n, c = len(ids), len(cont)
            out.append(self._judge(logits[row, n - c:n], cont))
        return out

    def _judge(self, logits: torch.Tensor, targets: Sequence[int]) -> Tuple[float, bool]:
        """(sum of target log-probs, all targets are the argmax) from next-token logits [c, V]."""
        logp = F.log_softmax(logits[:, :self.vocab_limit].float(), dim=-1)
        target = torch.as_tensor(list(targets), dtype=torch.long, device=logp.device)
        picked = logp.gather(1, target[:, None]).squeeze(1)
        return float(picked.sum()), bool((logp.argmax(dim=-1) == target).all())

    def engine(self) -> StreamingEngine:
        """A fresh stream over the bounded cache (one engine reused, reset per request)."""
        if self.stream_cache is None:
            self.stream_cache = stream_cache_for(self.model, self.max_length)
        if self._engine is None:
            self._engine = StreamingEngine(self.model, self.stream_cache)
        self._engine.reset()
        return self._engine

    def _stream_piece(self, engine: StreamingEngine, remaining: int) -> int:
        """How many tokens to feed next so that the cache evicts at exactly the moments token-by-token
        feeding would (when a token arrives at a full cache): up to the budget, then one token."""
        limit = engine.config.max_new_per_forward
        if limit is None:  # no eviction
            return min(remaining, self.max_length)
        room = engine.config.cache_size - engine.cache.length
        return max(1, min(remaining, limit, room))

    def _score_streaming(self, ctx: Sequence[int], cont: Sequence[int]) -> Tuple[float, bool]:
        """Feed context + continuation (minus its last token) through the cache; logits only for the
        pieces that predict continuation tokens. Equals feeding one token at a time (what the
        streaming perplexity tool does) up to rounding, in far fewer forwards."""
        engine = self.engine()
        whole = list(ctx) + list(cont)
        inputs, first_pred = whole[:-1], len(ctx) - 1  # inputs[first_pred] predicts cont[0]
        total, greedy, start = 0.0, True, 0
        while start < len(inputs):
            end = start + self._stream_piece(engine, len(inputs) - start)
            piece = inputs[start:end]
            if end <= first_pred:
                engine.forward(piece)
            else:
                logits = engine.forward(piece, all_logits=True)
                lo = max(first_pred, start)
                part_lp, part_greedy = self._judge(logits[lo - start:], whole[lo + 1:end + 1])
                total += part_lp
                greedy = greedy and part_greedy
            start = end
        return total, greedy

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, context: Sequence[int], max_new_tokens: int, should_stop: Callable[[List[int]], bool],
                 sampling: SamplingConfig = SamplingConfig(greedy=True), stop_ids: Iterable[int] = ()) -> List[int]:
        """New token ids after ``context``: one at a time through the KV cache (the model's rule inside
        it, exact while the stream is within the budget) until ``max_new_tokens``, a token of ``stop_ids``
        (not returned), or ``should_stop(generated)``."""
        if not context:
            raise InferenceError("empty context: nothing to generate from")
        if self.long_context == "truncate":
            context = list(context)[-max(1, self.max_length - max_new_tokens):]
            engine = StreamingEngine(self.model, CacheConfig("full"))
        else:
            engine = self.engine()
        stop = set(stop_ids)
        sampling = SamplingConfig(sampling.greedy, sampling.temperature, sampling.top_k, sampling.top_p,
                                  sampling.seed, self.vocab_limit)
        generator = make_generator(sampling)
        context, start = list(context), 0
        while start < len(context):
            end = start + self._stream_piece(engine, len(context) - start)
            logits = engine.forward(context[start:end])
            start = end
        out: List[int] = []
        while len(out) < max_new_tokens:
            token = sample_next_token(logits, sampling, generator)
            if token in stop:
                break
            out.append(token)
            if should_stop(out) or len(out) == max_new_tokens:
                break
            logits = engine.step(token)
        return out

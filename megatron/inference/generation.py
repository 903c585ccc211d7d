"""Text generation over the streaming engine: prefill the prompt, then decode token by token."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, Sequence

from megatron.errors import InferenceError
from megatron.inference.engine import StreamingEngine
from megatron.inference.sampling import SamplingConfig, make_generator, sample_next_token


def generate_tokens(engine: StreamingEngine, prompt_ids: Sequence[int], max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), stop_ids: Iterable[int] = (),
                    prefill_chunk: Optional[int] = None) -> Iterator[int]:
    """Yield generated ids one by one (a stop id is yielded, then generation ends)."""
    if len(prompt_ids) == 0:
        raise InferenceError("empty prompt: give at least one token of text")
    if max_new_tokens < 0:
        raise InferenceError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = set(stop_ids)
    generator = make_generator(sampling)
    logits = engine.forward(list(prompt_ids), chunk_size=prefill_chunk)
    for i in range(max_new_tokens):
        token = sample_next_token(logits, sampling, generator)
        yield token
        if token in stops or i == max_new_tokens - 1:
            return
        logits = engine.step(token)


class TextStreamer:
    """Turns generated ids into text pieces as they arrive. Decodes a short tail of ids each time so
    multi-byte characters split over tokens come out whole and the cost per token stays constant."""

    def __init__(self, decode: Callable[[Sequence[int]], str], tail: int = 8):
        self.decode, self.tail = decode, tail
        self.ids: List[int] = []
        self.flushed = ""  # text of self.ids already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        if text.startswith(self.flushed):
            piece = text[len(self.flushed):]
        else:  # the decoder re-spelled earlier text (rare): emit from where the two differ
            same = next((i for i, (x, y) in enumerate(zip(text, self.flushed)) if x != y), len(self.flushed))
            piece = text[same:]
        if len(self.ids) > self.tail:
            self.ids = self.ids[-self.tail:]
            self.flushed = self.decode(self.ids)
        else:
            self.flushed = text
        return piece

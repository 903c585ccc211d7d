"""YAML-driven generation as GPT-NeoX's generate.py does it (``text_gen_type`` unconditional / input-file /
interactive), through our model and its bounded Streaming-SepLLM cache (or, with ``recompute: true``,
the whole sequence through the model's own attention rule at every token).

Every sample is a JSON line with NeoX's fields: ``context`` (the prompt), ``text`` (the completion,
without the stop token), ``length`` (tokens generated), ``finished`` (stopped at the end-of-document or
the model's eos), ``message`` (a warning, else null) and ``duration_seconds``. A completion is the one
``tools/generate.py`` prints for the same prompt and settings; sample ``i`` uses seed ``seed + i``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, TextIO, Tuple

import torch

from megatron.config.schema import GenerationConfig
from megatron.errors import InferenceError
from megatron.inference.engine import StreamingEngine
from megatron.inference.generation import TextStreamer, generate_tokens
from megatron.inference.kv_cache import CacheConfig
from megatron.inference.sampling import SamplingConfig


def neox_sampling(g: GenerationConfig, seed: int, vocab_limit: Optional[int] = None) -> SamplingConfig:
    """NeoX's rule: greedy when temperature, top_k and top_p are all 0; otherwise sampling, where a
    temperature of 0 leaves the logits unscaled and top_p 0 is off."""
    greedy = g.temperature == 0 and g.top_k == 0 and g.top_p == 0
    return SamplingConfig(greedy=greedy, temperature=g.temperature or 1.0, top_k=g.top_k, top_p=g.top_p or 1.0,
                          seed=seed, vocab_limit=vocab_limit)


def cache_config(g: GenerationConfig) -> CacheConfig:
    return CacheConfig(g.cache_policy, g.init_cache_size, g.sep_cache_size, g.local_size, g.cache_size,
                       g.pos_shift, g.decode_mask)


class RecomputeEngine:
    """NeoX's ``recompute: true``: no KV cache; every token runs the whole sequence so far through the
    model (its training attention rule), at most ``max_length`` tokens. The StreamingEngine interface."""

    def __init__(self, model, max_length: int):
        self.model, self.max_length = model.eval(), max_length
        self.device = model.output_weight.device
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []

    @torch.no_grad()
    def forward(self, tokens: Sequence[int], chunk_size: Optional[int] = None) -> torch.Tensor:
        self.tokens.extend(int(t) for t in tokens)
        ids = torch.tensor([self.tokens], dtype=torch.long, device=self.device)
        return self.model.full_logits(ids)[0, -1].float()

    def step(self, token: int) -> torch.Tensor:
        return self.forward([token])


def split_prompts(text: str, prompt_end: str) -> List[str]:
    """NeoX: the file split at prompt_end, each prompt stripped, empty ones dropped."""
    return [p.strip() for p in text.split(prompt_end) if p.strip()]


class Generator:
    """One model, tokenizer and settings; ``complete(prompt, i)`` is sample i (seed + i)."""

    def __init__(self, model, tokenizer, g: GenerationConfig, seed: int, max_length: int, stops: Iterable[int]):
        self.model, self.tokenizer, self.g, self.seed = model, tokenizer, g, seed
        self.stops = tuple(stops)
        self.vocab_limit = min(tokenizer.vocab_size, model.vocab_size)
        self.max_length = max_length  # the model's seq_length: recompute's limit
        self.engine = RecomputeEngine(model, self.max_length) if self.g.recompute else \
            StreamingEngine(model, cache_config(self.g))

    def complete(self, prompt: str, index: int = 0) -> dict:
        start = time.perf_counter()
        ids = self.tokenizer.encode(prompt) if prompt else []
        context = ids or [self.tokenizer.eod_id]  # NeoX: an empty prompt is the end-of-document token
        budget, message = self.g.maximum_tokens, None
        if self.g.recompute:
            room = self.max_length - len(context)
            if room < 1:
                raise InferenceError(f"prompt of {len(context)} tokens leaves no room under seq_length "
                                     f"{self.max_length} with recompute: true (the streaming cache has no limit)")
            if room < budget:
                budget, message = room, f"stopped at seq_length {self.max_length} (recompute: true)"
        self.engine.reset()
        sampling = neox_sampling(self.g, self.seed + index, self.vocab_limit)
        out, finished = [], False
        for token in generate_tokens(self.engine, context, budget, sampling, self.stops, self.g.prefill_chunk):
            if token in self.stops:
                finished = True
                break
            out.append(token)
        if not out:
            message = "generation stopped at once: the first token was a stop token"
        streamer = TextStreamer(self.tokenizer.decode)  # tools/generate.py's text: a cut-off character is left out
        text = "".join(streamer.push(token) for token in out)
        return {"context": prompt, "text": text, "length": len(out), "finished": finished,
                "message": message, "duration_seconds": time.perf_counter() - start}


def write_jsonl(path: str, samples: List[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")


def read_prompts(g: GenerationConfig) -> List[str]:
    if not g.sample_input_file:
        raise InferenceError("text_gen_type input-file needs sample_input_file (the prompts, separated by "
                             "prompt_end)")
    path = Path(g.sample_input_file)
    if not path.is_file():
        raise InferenceError(f"sample_input_file '{path}' not found")
    prompts = split_prompts(path.read_text(encoding="utf-8"), g.prompt_end)
    if not prompts:
        raise InferenceError(f"sample_input_file '{path}' holds no prompt (prompts are separated by "
                             f"{g.prompt_end!r})")
    return prompts


def interactive_prompts(stream: TextIO, prompt_end: str, ask: Callable[[str], None]) -> Iterable[str]:
    """Prompts typed on ``stream`` until it ends: one line each with NeoX's prompt_end '\\n', else lines
    gathered until one holds prompt_end (the text before it ends the prompt)."""
    while True:
        ask("Context prompt >>> ")
        lines = []
        while True:
            line = stream.readline()
            if not line:
                return
            line = line.rstrip("\n")
            if prompt_end == "\n":
                lines.append(line)
                break
            if prompt_end in line:
                lines.append(line.split(prompt_end)[0])
                break
            lines.append(line)
        yield "\n".join(lines)


def plan(g: GenerationConfig) -> Tuple[Optional[List[str]], Optional[str]]:
    """(prompts, output file) of what ``text_gen_type`` says, checked before any model is loaded;
    interactive: (None, None)."""
    if g.text_gen_type is None:
        raise InferenceError("text_gen_type is not set; set it to unconditional, input-file or interactive "
                             "(NeoX's configs/text_generation.yml)")
    if g.text_gen_type == "interactive":
        return None, None
    if g.text_gen_type == "unconditional":
        return [""] * g.num_samples, g.sample_output_file
    return read_prompts(g), g.sample_output_file or f"{g.sample_input_file}.output.jsonl"


def run_generation(generator: Generator, planned: Tuple[Optional[List[str]], Optional[str]],
                   log: Callable[[str], None] = print, stdin: Optional[TextIO] = None) -> List[dict]:
    """Generate what :func:`plan` planned; returns the samples (written to the output file)."""
    prompts, output = planned
    samples: List[dict] = []
    if prompts is None:  # interactive
        for prompt in interactive_prompts(stdin or sys.stdin, generator.g.prompt_end,
                                          lambda s: print(s, end="", flush=True)):
            samples.append(generator.complete(prompt, len(samples)))
            print(f"Generated Text: {samples[-1]['text']}", flush=True)
        return samples
    for i, prompt in enumerate(prompts):
        samples.append(generator.complete(prompt, i))
        log(f"sample {i + 1}/{len(prompts)}: {samples[-1]['length']} tokens")
    if output:
        write_jsonl(output, samples)
        log(f"wrote {len(samples)} samples to {output}")
    return samples

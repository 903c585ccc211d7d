"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.errors import InferenceError


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = False
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    vocab_limit: Optional[int] = None  # real vocabulary size: the padded rows above it are never chosen

    def __post_init__(self):
        if self.temperature < 0:
            raise InferenceError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InferenceError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise InferenceError(f"vocab_limit must be >= 1, got {self.vocab_limit}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def make_generator(cfg: SamplingConfig) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled logits [V] (fp32) with the tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, cfg: SamplingConfig,
                      generator: Optional[torch.Generator] = None) -> int:
    """One token id from next-token logits [V]."""
    logits = logits.detach().cpu()
    if cfg.vocab_limit is not None:
        logits = logits[: cfg.vocab_limit]
    if cfg.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, cfg), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

"""Linear warmup then cosine / linear / constant decay to ``min_lr`` (GPT-NeoX semantics)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    @classmethod
    def from_config(cls, cfg) -> "LRSchedule":
        tr = cfg.training
        decay = tr.lr_decay_iters or tr.train_iters
        warmup = tr.warmup_iters if tr.warmup_iters is not None else int(tr.warmup * decay)
        return cls(cfg.optimizer.params.lr, tr.min_lr, warmup, decay, tr.lr_decay_style)

    def lr_at(self, iteration: int) -> float:
        """Learning rate used by the optimizer step of ``iteration`` (1-based)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        span = max(1, self.decay_iters - self.warmup_iters)
        ratio = (iteration - self.warmup_iters) / span
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

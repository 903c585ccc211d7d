"""BiPE, the bilevel positions SepLLM trains with (He et al. 2024, "Two stones hit one bird").

Separator tokens end segments: a separator is the last token of its segment and the next token
starts a new one. Every token gets two positions:
  * intra -- its offset inside its segment (0 at the first token after a separator);
  * inter -- its segment index (the number of separators strictly before it).
The model adds a learned table at the intra positions to the token embeddings and encodes the inter
positions with rotary (rotary-BiPE) or ALiBi (ALiBi-BiPE), as SepLLM's training code does.
Positions restart at the start of every sample, not at document boundaries (same as plain positions).
"""
from __future__ import annotations

from typing import Tuple

import torch


def bilevel_positions(tokens: torch.Tensor, separator_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(intra, inter) positions [B, L] (long) of ``tokens`` [B, L] whose segments end at ``separator_ids``."""
    is_sep = torch.isin(tokens, separator_ids.to(tokens.device))
    inter = torch.cumsum(is_sep.long(), dim=-1) - is_sep.long()
    index = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    last_sep = torch.cummax(torch.where(is_sep, index, torch.full_like(index, -1)), dim=-1).values
    last_sep_before = torch.cat([torch.full_like(last_sep[..., :1], -1), last_sep[..., :-1]], dim=-1)
    return index - last_sep_before - 1, inter

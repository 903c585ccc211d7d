"""The Sep-Attention visibility rule: the single source of truth.

Key ``j`` is visible to query ``i`` iff ``j <= i`` and at least one of
  * initial:   ``j < n_init``
  * separator: token ``j`` is a separator (judged on the key side only)
  * local:     ``i - j < n_local`` (the window counts the query itself)
With ``separate_documents`` attention never crosses a document boundary and
"initial" means the first ``n_init`` tokens of each document.

Every variant reduces to this rule through the per-token ``is_sep`` flags:
  * ``sepllm``          -- is_sep = token id in the separator set
  * ``streamingllm``    -- is_sep = False everywhere (initial + local only)
  * ``fixed_interval``  -- is_sep = every ``interval``-th position (last of each block)
  * ``full``            -- is_sep = True everywhere (plain causal attention)

Fast paths consume ``is_sep[b, j]`` (and ``doc_ids[b, j]``); only the reference
and the tests ever build the dense L x L mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

MODES = ("sepllm", "streamingllm", "fixed_interval", "full")


def rule_problem(mode: str, n_init: int, n_local: int, interval: int) -> Optional[str]:
    """Why these settings are no rule (one line), or None.

    ``n_local`` counts the query itself, so 1 is the smallest window (the query alone) and every
    query sees at least one key. 0 is refused rather than read as "no window": a query that is
    neither initial nor a separator would see nothing, and every kernel takes the band to hold
    the query. ``megatron/config/validation.py`` (a lower layer, no import) checks the same bounds.
    """
    if mode not in MODES:
        return f"mode must be one of {MODES}, got {mode!r}"
    if n_init < 0 or n_local < 1 or interval < 1:
        return (f"needs n_init >= 0, n_local >= 1 (the local window counts the query itself), interval >= 1; "
                f"got n_init={n_init}, n_local={n_local}, interval={interval}")
    return None


@dataclass(frozen=True)
class SepRule:
    """Resolved Sep-Attention settings of one layer; settings ``rule_problem`` refuses raise ValueError,
    so no kernel ever sees them."""

    mode: str = "sepllm"
    n_init: int = 3
    n_local: int = 64
    interval: int = 5
    separate_documents: bool = False

    def __post_init__(self) -> None:
        problem = rule_problem(self.mode, self.n_init, self.n_local, self.interval)
        if problem:
            raise ValueError(f"Sep-Attention rule: {problem}")

    @property
    def is_full(self) -> bool:
        return self.mode == "full"


def separator_flags(tokens: torch.Tensor, rule: SepRule,
                    separator_ids: Optional[torch.Tensor] = None,
                    positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token ``is_sep`` flags [B, L] (bool) for ``tokens`` [B, L] under ``rule``.

    ``positions`` (same shape, default ``arange(L)``) is only used by ``fixed_interval``.
    """
    if rule.mode == "full":
        return torch.ones_like(tokens, dtype=torch.bool)
    if rule.mode == "streamingllm":
        return torch.zeros_like(tokens, dtype=torch.bool)
    if rule.mode == "fixed_interval":
        if positions is None:
            positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
        return (positions % rule.interval) == (rule.interval - 1)
    if separator_ids is None or separator_ids.numel() == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, separator_ids.to(tokens.device))


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Document index of each token [B, L]; the EOD token closes its document."""
    is_eod = (tokens == eod_id).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """Offset of each token from the start of its document [B, L]."""
    L = doc_ids.shape[-1]
    idx = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    start_idx = torch.cummax(start_idx, dim=-1).values
    return idx - start_idx


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, k_is_sep: torch.Tensor,
            n_init: int, n_local: int, k_pos_in_doc: Optional[torch.Tensor] = None,
            same_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rule itself, elementwise on broadcastable tensors."""
    k_init_pos = k_pos if k_pos_in_doc is None else k_pos_in_doc
    keep = (k_pos <= q_pos) & ((k_init_pos < n_init) | k_is_sep | (q_pos - k_pos < n_local))
    if same_doc is not None:
        keep = keep & same_doc
    return keep


def dense_mask(is_sep: torch.Tensor, rule: SepRule,
               doc_ids: Optional[torch.Tensor] = None,
               q_offset: int = 0) -> torch.Tensor:
    """Dense boolean mask [B, Lq, Lk] (True = attend). Reference and tests only.

    ``is_sep`` is [B, Lk]; queries are the last ``Lk - q_offset`` positions when
    ``q_offset`` > 0 (prefill continuation).
    """
    B, Lk = is_sep.shape
    dev = is_sep.device
    k_pos = torch.arange(Lk, device=dev)
    q_pos = torch.arange(q_offset, Lk, device=dev)
    same_doc = k_in_doc = None
    if rule.separate_documents and doc_ids is not None:
        same_doc = doc_ids[:, q_offset:, None] == doc_ids[:, None, :]
        k_in_doc = positions_in_document(doc_ids)[:, None, :]
    return visible(q_pos[None, :, None], k_pos[None, None, :], is_sep[:, None, :],
                   rule.n_init, rule.n_local, k_in_doc, same_doc)


def kv_kept_per_query(is_sep: torch.Tensor, rule: SepRule,
                      doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Number of keys each query attends to [B, L], without building an L x L mask.

    For query i: the local window ``min(i + 1, n_local)`` plus every key older than the
    window that is initial or a separator. With documents, counts restart per document.
    """
    B, L = is_sep.shape
    dev = is_sep.device
    if rule.separate_documents and doc_ids is not None:
        pos = positions_in_document(doc_ids)
    else:
        pos = torch.arange(L, device=dev).expand(B, L)
    special = (is_sep | (pos < rule.n_init)).long()
    csum = torch.cumsum(special, dim=-1)  # csum[j] = #special in [.., j]
    window = torch.clamp(pos + 1, max=rule.n_local)
    # Specials strictly before the window start (index i - n_local), within the same doc.
    before_idx = torch.arange(L, device=dev).expand(B, L) - rule.n_local
    doc_start_idx = torch.arange(L, device=dev).expand(B, L) - pos
    has_before = before_idx >= doc_start_idx
    gathered = torch.gather(csum, 1, before_idx.clamp(min=0))
    base = torch.gather(csum, 1, (doc_start_idx - 1).clamp(min=0))
    base = torch.where(doc_start_idx > 0, base, torch.zeros_like(base))
    older = torch.where(has_before, gathered - base, torch.zeros_like(gathered))
    return window + older


def kv_kept_fraction(is_sep: torch.Tensor, rule: SepRule,
                     doc_ids: Optional[torch.Tensor] = None) -> float:
    """Average keys kept per query relative to full causal attention (0..1]."""
    kept = kv_kept_per_query(is_sep, rule, doc_ids).double()
    if rule.separate_documents and doc_ids is not None:
        full = positions_in_document(doc_ids).double() + 1
    else:
        full = torch.arange(1, is_sep.shape[1] + 1, device=is_sep.device).double().expand_as(kept)
    return float(kept.sum() / full.sum())


def resolve_layer_rules(num_layers: int, mode: str, n_init: int, n_local: int, interval: int,
                        separate_documents: bool, full_attention_layers: Sequence[int] = (),
                        layer_n_local: Optional[dict] = None) -> list:
    """Per-layer rules for hybrid variants (H, HT, HMT, per-layer windows).

    ``full_attention_layers`` accepts negative indices (-1 = last layer).
    """
    full = {i % num_layers for i in full_attention_layers}
    windows = {int(k) % num_layers: int(v) for k, v in (layer_n_local or {}).items()}
    rules = []
    for layer in range(num_layers):
        layer_mode = "full" if layer in full else mode
        rules.append(SepRule(layer_mode, n_init, windows.get(layer, n_local), interval,
                             separate_documents))
    return rules

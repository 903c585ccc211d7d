"""Per-step lookup tables for the Triton Sep-Attention kernels (impl ``triton``); pure PyTorch.

The kernels (``triton_sep.py``) work on two key sets per query ``i`` (see ``compact.py``):
  * the *specials* (initial tokens and separators, ``compact.special_flags``) at positions
    ``<= i - n_local``, gathered in position order into a compact list of ``S`` slots;
  * the local band ``(i - n_local, i]`` of the original sequence.
Because the specials are sorted, the ones visible to a query are a run of slots, and every
tile list a kernel program needs (its range of special slots, its local key range, its
query blocks in the backward, and which of those tiles need no mask at all) follows from a
few per-position integers. So the plan holds only those per-position tables, built once per
step without any host sync, and each program derives its own tile lists in O(1) scalar
loads. The plan depends neither on ``n_local`` nor on the kernels' block sizes: one plan
serves every layer of a step, per-layer windows included, and the forward and both
backward kernels.

Documents: ``run_start`` / ``run_end`` bound the run of equal document ids around a
position. A tile whose keys and queries all lie in one run needs no document mask. With
contiguous (non-decreasing) ids the runs are the documents and also bound the ranges;
ids that repeat (A B A) only tighten nothing and leave the rest to the masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.attention.compact import LastInputsCache, gather_specials, special_flags
from megatron.attention.sepllm_rule import SepRule, positions_in_document

# Position of a padding slot: larger than any query position minus any window, so never visible.
NEVER = 1 << 30


@dataclass
class SepTilePlan:
    special_idx: torch.Tensor  # [B, S] int64: positions to gather the specials from (padding: any valid index)
    special_pos: torch.Tensor  # [B, S] int32: positions of the specials, NEVER on padding slots; S >= 1
    n_before: torch.Tensor  # [B, L + 1] int32: number of specials at positions < t; [:, L] = count per row
    doc: Optional[torch.Tensor]  # [B, L] int32 document ids (None: no document separation)
    special_doc: Optional[torch.Tensor]  # [B, S] int32 document of each slot (-1 on padding)
    run_start: Optional[torch.Tensor]  # [B, L] int32 first position of the run of equal ids holding t
    run_end: Optional[torch.Tensor]  # [B, L] int32 one past the last position of that run
    contiguous_docs: bool  # ids never repeat after a change: runs are documents and bound ranges

    @property
    def has_docs(self) -> bool:
        return self.doc is not None


def _run_bounds(docs: torch.Tensor):
    B, L = docs.shape
    pos = torch.arange(L, device=docs.device).expand(B, L)
    start = pos - positions_in_document(docs)
    last = torch.ones_like(docs, dtype=torch.bool)
    last[:, :-1] = docs[:, 1:] != docs[:, :-1]
    end_if_last = torch.where(last, pos + 1, torch.full_like(pos, L))
    end = torch.flip(torch.cummin(torch.flip(end_if_last, [1]), dim=1).values, [1])
    return start.int().contiguous(), end.int().contiguous()


def build_tile_plan(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor] = None) -> SepTilePlan:
    """Everything the kernels need from ``is_sep`` [B, L] / ``doc_ids`` [B, L] under ``rule``."""
    B, L = is_sep.shape
    dev = is_sep.device
    docs = doc_ids if (rule.separate_documents and doc_ids is not None) else None
    special = special_flags(is_sep, rule, docs)
    idx, pos = gather_specials(special, never_visible=NEVER)
    if idx.shape[1] == 0:  # no specials anywhere: one padding slot keeps every buffer non-empty
        idx = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pos = torch.full((B, 1), NEVER, dtype=torch.long, device=dev)
    n_before = torch.zeros(B, L + 1, dtype=torch.int32, device=dev)
    n_before[:, 1:] = torch.cumsum(special.int(), dim=1)
    plan = SepTilePlan(idx.contiguous(), pos.int().contiguous(), n_before, None, None, None, None, True)
    if docs is not None:
        plan.doc = docs.int().contiguous()
        real = pos < NEVER
        plan.special_doc = torch.where(real, docs.gather(1, idx), -1).int().contiguous()
        plan.run_start, plan.run_end = _run_bounds(docs)
        plan.contiguous_docs = bool((docs[:, 1:] >= docs[:, :-1]).all()) if L > 1 else True
    return plan


_PLANS = LastInputsCache()


def cached_tile_plan(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor] = None) -> SepTilePlan:
    """The plan of the most recent flags, rebuilt only when they change (once per model step).
    The window is not part of the key: layers with different ``n_local`` share one plan."""
    settings = (rule.n_init, rule.separate_documents and doc_ids is not None)
    return _PLANS.get(is_sep, doc_ids, settings, lambda: build_tile_plan(is_sep, rule, doc_ids))

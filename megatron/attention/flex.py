"""FlexAttention Sep-Attention over the compact key layout (impl ``flex``, the GPU path).

Plain FlexAttention over the original layout skips almost nothing: with a separator every
~10 tokens nearly every 128 x 128 tile holds a visible key. Here keys and values are laid
out as ``[specials, padded | original sequence]``:
  * the specials visible to a query are a prefix of the first part (see ``compact.py``),
    so per query tile they form a short run of tiles, mostly *full* (no mask_mod needed);
  * the local band ``(i - n_local, i]`` touches only 1-3 tiles of the second part.
The BlockMask is built directly from per-tile counts (``BlockMask.from_kv_blocks``), never
by evaluating the mask on all L x L pairs. ``mask_mod`` refines the partial tiles.

ALiBi is a ``score_mod``: the key layout maps every key slot back to its token index (``key_index``),
and the bias is ``-slope_h * (pos[q] - pos[key])`` with ``pos`` the token or BiPE segment index.

On CUDA ``flex_attention`` is compiled to Triton (forward and backward). Elsewhere it runs
eagerly, which is only useful for checking the forward on small inputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron.attention.alibi import AlibiBias
from megatron.attention.compact import LastInputsCache, gather_specials, special_flags
from megatron.attention.sepllm_rule import SepRule, positions_in_document

FLEX_BLOCK = 128


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def special_capacity(num_specials: int, seq_len: int, block: int = FLEX_BLOCK) -> int:
    """Padded size of the special part, bucketed to multiples of ~L/4 so the compiled kernel
    sees at most 4 shapes per length as the separator count changes from batch to batch
    (below torch.compile's recompile limit). Padding tiles are dead: they cost memory only."""
    bucket = max(block, _round_up(max(seq_len // 4, 1), block))
    return _round_up(max(num_specials, 1), bucket)


@dataclass
class FlexLayout:
    special_idx: torch.Tensor  # [B, S_cap] positions gathered into the special part
    block_mask: BlockMask
    capacity: int  # S_cap, a multiple of the tile size

    def key_index(self, seq_len: int) -> torch.Tensor:
        """[B, capacity + seq_len]: the token index of every key slot (padding slots: any valid index)."""
        B = self.special_idx.shape[0]
        local = torch.arange(seq_len, device=self.special_idx.device).expand(B, -1)
        return torch.cat([self.special_idx, local], dim=1)


def _ranges_to_blocks(lo: torch.Tensor, hi: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """[..., n_blocks] bool: tile ``t`` (elements [t*block, (t+1)*block)) meets [lo, hi)."""
    t = torch.arange(n_blocks, device=lo.device)
    return (t * block < hi[..., None]) & ((t + 1) * block > lo[..., None]) & (hi > lo)[..., None]


def _ranges_to_full_blocks(lo: torch.Tensor, hi: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """[..., n_blocks] bool: tile ``t`` lies entirely inside [lo, hi)."""
    t = torch.arange(n_blocks, device=lo.device)
    return (t * block >= lo[..., None]) & ((t + 1) * block <= hi[..., None])


def _sort_live_first(live: torch.Tensor):
    num = live.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort((~live).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def build_flex_layout(is_sep: torch.Tensor, rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                      block: int = FLEX_BLOCK) -> FlexLayout:
    B, L = is_sep.shape
    dev = is_sep.device
    w = rule.n_local
    docs = doc_ids if (rule.separate_documents and doc_ids is not None) else None
    special = special_flags(is_sep, rule, docs)
    never = L + w  # a position no query ever sees as a special
    idx, pos = gather_specials(special, never_visible=never)
    cap = special_capacity(idx.shape[1], L, block)
    pad = cap - idx.shape[1]
    idx = torch.nn.functional.pad(idx, (0, pad))
    pos = torch.nn.functional.pad(pos, (0, pad), value=never)

    n_q, n_loc = (L + block - 1) // block, (L + block - 1) // block
    n_sp = cap // block
    q_first = torch.arange(n_q, device=dev) * block
    q_last = torch.clamp(q_first + block, max=L) - 1
    csum0 = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                       torch.cumsum(special.long(), dim=1)], dim=1)  # csum0[:, t + 1] = #specials <= t
    # Specials visible to query i are compact slots [lo, c(i)), c(i) = #specials at <= i - w.
    hi = csum0[:, (q_last - w + 1).clamp(min=0)]  # [B, n_q], for the tile's last query
    hi_full = csum0[:, (q_first - w + 1).clamp(min=0)]  # visible to every query of the tile
    lo = torch.zeros_like(hi)
    loc_lo = (q_first - w + 1).clamp(min=0).expand(B, n_q)
    loc_hi = (q_last + 1).expand(B, n_q)
    # Tiles every query of the tile sees entirely skip mask_mod ("full" tiles).
    full_sp_lo = lo
    full_loc_lo = (q_last - w + 1).clamp(min=0).expand(B, n_q)
    full_loc_hi = (q_first + 1).expand(B, n_q)
    contiguous_docs = docs is None or bool((docs[:, 1:] >= docs[:, :-1]).all())
    if docs is not None and contiguous_docs:
        doc_start = torch.arange(L, device=dev) - positions_in_document(docs)
        first_start, last_start = doc_start[:, q_first], doc_start[:, q_last]
        lo = csum0.gather(1, first_start)
        loc_lo = torch.maximum(loc_lo, first_start)
        # Only keys in the document of the tile's last query can be seen by all of its queries.
        full_sp_lo = csum0.gather(1, last_start)
        full_loc_lo = torch.maximum(full_loc_lo, last_start)
    sp_live = _ranges_to_blocks(lo, torch.maximum(hi, lo), n_sp, block)
    loc_live = _ranges_to_blocks(loc_lo, loc_hi, n_loc, block)
    sp_full = _ranges_to_full_blocks(full_sp_lo, hi_full, n_sp, block)
    loc_full = _ranges_to_full_blocks(full_loc_lo, full_loc_hi, n_loc, block)
    if not contiguous_docs:  # repeated document ids: let mask_mod decide everywhere
        sp_full, loc_full = torch.zeros_like(sp_live), torch.zeros_like(loc_live)
    full = torch.cat([sp_full, loc_full], dim=-1)
    partial = torch.cat([sp_live, loc_live], dim=-1) & ~full
    kv_num, kv_idx = _sort_live_first(partial[:, None])
    full_num, full_idx = _sort_live_first(full[:, None])

    mask_mod = _make_mask_mod(pos, docs, idx, cap, w, L, block)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                  mask_mod=mask_mod, seq_lengths=(L, cap + L))
    return FlexLayout(idx, bm, cap)


def _make_mask_mod(special_pos: torch.Tensor, docs: Optional[torch.Tensor], special_idx: torch.Tensor,
                   cap: int, w: int, L: int, block: int) -> Callable:
    B = special_pos.shape[0]
    dev = special_pos.device
    # One lookup table over the whole key layout (padded to whole tiles so any index is safe).
    kv_len = _round_up(cap + L, block)
    key_pos = torch.full((B, kv_len), -(L + w + 1), dtype=torch.long, device=dev)
    key_pos[:, :cap] = special_pos
    key_pos[:, cap:cap + L] = torch.arange(L, device=dev)
    q_len = _round_up(L, block)
    if docs is not None:
        key_doc = torch.full((B, kv_len), -1, dtype=docs.dtype, device=dev)
        key_doc[:, :cap] = docs.gather(1, special_idx)
        key_doc[:, cap:cap + L] = docs
        q_doc = torch.full((B, q_len), -2, dtype=docs.dtype, device=dev)
        q_doc[:, :L] = docs

    def sep_mask(b, h, q_idx, kv_idx):
        dist = q_idx - key_pos[b, kv_idx]
        keep = torch.where(kv_idx < cap, dist >= w, (dist >= 0) & (dist < w))
        if docs is not None:
            keep = keep & (key_doc[b, kv_idx] == q_doc[b, q_idx])
        return keep

    return sep_mask


_LAYOUTS = LastInputsCache()


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex_sep_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                       rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, layout: Optional[FlexLayout] = None,
                       compile: Optional[bool] = None, bias: Optional[AlibiBias] = None) -> torch.Tensor:
    """Sep-Attention via FlexAttention; q [B, Hq, L, D], k/v [B, Hkv, L, D] -> [B, Hq, L, D].

    ``compile`` defaults to True on CUDA. Eager FlexAttention ignores tile sparsity and has no
    CPU backward: use it on CPU only to check the forward.
    """
    if layout is None:
        layout = _LAYOUTS.get(is_sep, doc_ids, (rule,), lambda: build_flex_layout(is_sep, rule, doc_ids))
    B, Hkv, L, D = k.shape
    gather = layout.special_idx[:, None, :, None].expand(B, Hkv, layout.capacity, D)
    k_all = torch.cat([k.gather(2, gather), k], dim=2)
    v_all = torch.cat([v.gather(2, gather), v], dim=2)
    if compile is None:
        compile = q.is_cuda
    fn = _compiled_flex() if compile else flex_attention
    score_mod = None if bias is None else _alibi_score_mod(bias, layout.key_index(L), L)
    return fn(q, k_all, v_all, score_mod=score_mod, block_mask=layout.block_mask, scale=scale,
              enable_gqa=q.shape[1] != Hkv)


def _alibi_score_mod(bias: AlibiBias, key_index: torch.Tensor, seq_len: int) -> Callable:
    """score_mod adding ALiBi: distance tables per query row and key slot, looked up by index (padded to
    whole tiles, like the mask_mod's tables, so any index the kernel forms is safe)."""
    dev = key_index.device
    pad = torch.nn.functional.pad
    k_pos = bias.position_at(key_index)  # [B, S_cap + L]
    k_pos = pad(k_pos, (0, _round_up(k_pos.shape[1], FLEX_BLOCK) - k_pos.shape[1]))
    q_pos = bias.position_at(torch.arange(seq_len, device=dev)[None]).expand(k_pos.shape[0], -1)
    q_pos = pad(q_pos, (0, _round_up(seq_len, FLEX_BLOCK) - seq_len)).contiguous()
    slopes = bias.slopes.to(device=dev, dtype=torch.float32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_pos[b, q_idx] - k_pos[b, kv_idx])

    return alibi

"""Sep-Attention as our own FlashAttention-2-style Triton kernels, forward and backward (impl ``triton``).

Query ``i`` sees the specials (initial tokens + separators) at positions ``<= i - n_local``
and the local band ``(i - n_local, i]`` (see ``sepllm_rule.py``; the split is ``compact.py``'s).
The specials are gathered once per call into a compact ``[B, Hkv, S, D]`` buffer; the
visible ones form a run of slots, so per query block a program visits
  (a)+(b) the special tiles ``[n_before[doc start], n_before[last query - n_local + 1])`` --
          the initial tokens are the first slots, the separators preceding the block follow;
  (c)     the local band tiles ``[first query - n_local + 1, last query]``;
and applies the rule's mask only on boundary tiles: a tile every query of the block sees
entirely (computed from the same tables, see ``triton_plan.py``) runs without one. Softmax
is online in fp32 (exp2 with the scale folded in); the base-2 log-sum-exp is saved.

Backward: three kernels, no atomics, deterministic.
  * ``dq``: per query block, the same tile lists as the forward, recomputing P from the lse.
  * ``dkdv_local``: per key tile of the original sequence, the query blocks whose local band
    covers it (``[j, j + n_local)``); it owns its dK/dV rows and writes them.
  * ``dkdv_special``: per tile of special slots and chunk of the later query blocks that see
    it (``[pos + n_local, end of document)``), fp32 partial dK/dV; the chunks are summed in a
    fixed order and added to the slots' original rows (``scatter_add_``; each position is one
    slot at most, so no two adds meet). A special tile is seen by every later query block:
    unchunked, its S / BLOCK_N programs would each loop over up to L / BLOCK_M blocks -- too few
    programs for a GPU -- so on CUDA the query range is cut into enough chunks to fill the SMs
    twice (``default_special_chunks``).
Why not FlashAttention-2's single pass with dQ atomics: dQ rows would receive adds from every
key tile that covers them, special tiles included (atomics on a zeroed fp32 dQ, then a cast,
and non-deterministic sums). Two passes recompute QK^T and dO V^T once more (7 matmuls
instead of 5 for the backward) but are deterministic and atomic-free; which is faster on a
given GPU is a benchmark question (bench/RESULTS.md, OPEN).

GQA: a forward / dq program serves one query head; a dK/dV program serves one key/value
head and loops over its group of query heads, so K/V are never repeated and dK/dV need no
reduction. Inputs may be strided views (the model passes [B, L, H, D] transposed) as long as
the last dim is contiguous and one tile's rows span less than 2^31 elements (``fits_int32_tile``;
a view with longer rows is copied). bf16/fp16 inputs use fp32 accumulation; fp32 inputs use IEEE
fp32 dots (no TF32) -- that is what the interpreter tests run. Imported only on the triton path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton

from megatron.attention.sepllm_rule import SepRule
from megatron.attention.triton_plan import SepTilePlan, cached_tile_plan
from megatron.attention.triton_sep_kernels import (
    sep_dkdv_local_kernel,
    sep_dkdv_special_kernel,
    sep_dq_kernel,
    sep_fwd_kernel,
)
from megatron.kernels.dispatch import interpret_enabled

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Launch configurations and the autograd Function
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel: BLOCK_M query rows x BLOCK_N keys, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shipped configurations, keyed by (kernel, padded head dim, 16-bit inputs). The 16-bit rows are the
# GPU training path: for each, the largest tiles (in a short preference list) that ptxas compiles
# without register spills for both sm_90 and sm_80 (python -m megatron.attention.triton_aot
# --arch 90|80; registers in bench/RESULTS.md). The fp32 rows are a correctness
# fallback (GPU training runs bf16): IEEE fp32 dots run on FMA units and spill on sm_90 at head dim
# 128 with every tile size tried; these rows are the smallest spills found. Speed on a GPU is OPEN.
CONFIGS: Dict[Tuple[str, int, bool], KernelConfig] = {
    ("fwd", 64, True): KernelConfig(128, 64, 8, 3),
    ("fwd", 128, True): KernelConfig(128, 32, 8, 3),
    ("fwd", 256, True): KernelConfig(32, 32, 4, 1),
    ("dq", 64, True): KernelConfig(128, 32, 8, 2),
    ("dq", 128, True): KernelConfig(64, 32, 4, 2),
    ("dq", 256, True): KernelConfig(32, 32, 4, 1),
    ("dkdv", 64, True): KernelConfig(32, 128, 8, 1),
    ("dkdv", 128, True): KernelConfig(64, 32, 4, 1),
    ("dkdv", 256, True): KernelConfig(32, 32, 8, 1),
    ("fwd", 64, False): KernelConfig(64, 32, 8, 2),
    ("fwd", 128, False): KernelConfig(32, 16, 4, 1),
    ("fwd", 256, False): KernelConfig(16, 16, 4, 1),
    ("dq", 64, False): KernelConfig(64, 32, 8, 2),
    ("dq", 128, False): KernelConfig(32, 32, 8, 2),
    ("dq", 256, False): KernelConfig(16, 16, 4, 1),
    ("dkdv", 64, False): KernelConfig(16, 32, 4, 1),
    ("dkdv", 128, False): KernelConfig(16, 32, 4, 1),
    ("dkdv", 256, False): KernelConfig(16, 16, 4, 1),
}
MAX_HEAD_DIM = 256


def padded_head_dim(D: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(D))


def kernel_config(kernel: str, D: int, dtype: torch.dtype) -> KernelConfig:
    """The shipped configuration for head dim ``D`` (small dims use the 64 row)."""
    return CONFIGS[(kernel, max(64, padded_head_dim(D)), dtype != torch.float32)]


def dot_precision(dtype: torch.dtype, interpreting: bool = False) -> str:
    """How tl.dot treats the inputs: fp32 inputs get IEEE fp32 products (TF32 would miss the fp32
    reference; "tf32x3" measured no fewer spills); 16-bit inputs run native tensor-core products (the
    value is ignored), except bf16 in Triton's interpreter, which must upcast (see ``_dot``)."""
    if interpreting and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Launch:
    """What one call needs besides the tensors: rule window, scale and (overridable) tile sizes."""

    window: int
    scale: float
    blocks: Optional[Tuple[int, int]] = None  # tests: (BLOCK_M, BLOCK_N) for every kernel
    special_chunks: Optional[int] = None  # tests: query chunks of the special dK/dV pass

    def config(self, kernel: str, D: int, dtype: torch.dtype) -> KernelConfig:
        cfg = kernel_config(kernel, D, dtype)
        if self.blocks is None:
            return cfg
        return KernelConfig(self.blocks[0], self.blocks[1], cfg.num_warps, cfg.num_stages)

    def tile_rows(self, D: int, dtype: torch.dtype) -> int:
        """The most rows (queries or keys) one tile of any of the kernels spans."""
        return max(max(c.block_m, c.block_n) for c in (self.config(k, D, dtype) for k in ("fwd", "dq", "dkdv")))


def fits_int32_tile(row_stride: int, tile_rows: int) -> bool:
    """Whether the offsets inside one tile (rows x row stride + a head dim) stay below 2^31, as the
    dK/dV query loop needs at head dim 256 and in fp32 (it adds them in int32 to the tile's int64
    first row, ``triton_sep_kernels``)."""
    return (tile_rows - 1) * row_stride + MAX_HEAD_DIM < 2 ** 31


def _plan_args(plan: SepTilePlan):
    """(special_pos, special_doc, n_before, doc, run_start, run_end); unused tables point at n_before."""
    dummy = plan.n_before
    return (plan.special_pos, plan.special_doc if plan.has_docs else dummy, plan.n_before,
            plan.doc if plan.has_docs else dummy, plan.run_start if plan.has_docs else dummy,
            plan.run_end if plan.has_docs else dummy)


def _gather_specials(x: torch.Tensor, plan: SepTilePlan) -> torch.Tensor:
    B, H, _, D = x.shape
    idx = plan.special_idx[:, None, :, None].expand(B, H, plan.special_idx.shape[1], D)
    return x.gather(2, idx).contiguous()


def _like_model_layout(x: torch.Tensor) -> torch.Tensor:
    """Empty [B, H, L, D] stored as [B, L, H, D]: the layout the model reshapes for free."""
    B, H, L, D = x.shape
    return torch.empty(B, L, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def _kernel_layout(x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """An input as the kernels take it: unit last stride, and a row stride short enough for
    ``fits_int32_tile`` (a model layout always is; a view with longer rows is copied)."""
    return x if x.stride(-1) == 1 and fits_int32_tile(x.stride(2), tile_rows) else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def sep_forward(q, k, v, plan: SepTilePlan, launch: Launch):
    B, Hq, L, D = q.shape
    S = plan.special_pos.shape[1]
    group = Hq // k.shape[1]
    ks, vs = _gather_specials(k, plan), _gather_specials(v, plan)
    out = _like_model_layout(q)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    cfg = launch.config("fwd", D, q.dtype)
    spos, sdoc, n_before, doc, run_start, _ = _plan_args(plan)
    sep_fwd_kernel[(triton.cdiv(L, cfg.block_m), B * Hq)](
        q, k, v, ks, vs, out, lse, spos, sdoc, n_before, doc, run_start,
        L, S, Hq, group, launch.window, launch.scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        HAS_DOCS=plan.has_docs, CONTIGUOUS=plan.contiguous_docs, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=padded_head_dim(D), PRECISION=dot_precision(q.dtype, interpret_enabled()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def sep_backward(grad_out, q, k, v, out, lse, plan: SepTilePlan, launch: Launch):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    S = plan.special_pos.shape[1]
    group = Hq // Hkv
    grad_out = _kernel_layout(grad_out, launch.tile_rows(D, q.dtype))
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), [B, Hq, L]
    ks, vs = _gather_specials(k, plan), _gather_specials(v, plan)
    dq, dk, dv = _like_model_layout(q), _like_model_layout(k), _like_model_layout(v)
    spos, sdoc, n_before, doc, run_start, run_end = _plan_args(plan)
    common = dict(HAS_DOCS=plan.has_docs, CONTIGUOUS=plan.contiguous_docs, D=D, BLOCK_D=padded_head_dim(D),
                  PRECISION=dot_precision(q.dtype, interpret_enabled()))
    qk_scale, W = launch.scale * LOG2E, launch.window

    cfg = launch.config("dq", D, q.dtype)
    sep_dq_kernel[(triton.cdiv(L, cfg.block_m), B * Hq)](
        q, k, v, ks, vs, grad_out, lse, delta, dq, spos, sdoc, n_before, doc, run_start,
        L, S, Hq, group, W, qk_scale, launch.scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)

    cfg = launch.config("dkdv", D, q.dtype)
    # Pass 1 owns every dK/dV row (each key is in its own query's band); pass 2 adds the specials' share.
    sep_dkdv_local_kernel[(triton.cdiv(L, cfg.block_n), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, doc, run_end,
        L, Hq, group, W, qk_scale, launch.scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    slot_tiles, query_blocks = triton.cdiv(S, cfg.block_n), triton.cdiv(L, cfg.block_m)
    chunks = launch.special_chunks or default_special_chunks(slot_tiles * B * Hkv, query_blocks, q.device)
    chunk_blocks = triton.cdiv(query_blocks, chunks)
    chunks = triton.cdiv(query_blocks, chunk_blocks)
    dk_part = torch.zeros(chunks, B, Hkv, S, D, dtype=torch.float32, device=q.device)
    dv_part = torch.zeros_like(dk_part)
    sep_dkdv_special_kernel[(slot_tiles, chunks, B * Hkv)](
        q, ks, vs, grad_out, lse, delta, dk_part, dv_part, spos, sdoc, n_before, doc, run_end,
        L, S, Hq, group, W, qk_scale, launch.scale, chunk_blocks,
        *_strides(q), *_strides(grad_out),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    index = plan.special_idx[:, None, :, None].expand(B, Hkv, S, D)
    dk.scatter_add_(2, index, dk_part.sum(0).to(dk.dtype))  # padding slots add zeros
    dv.scatter_add_(2, index, dv_part.sum(0).to(dv.dtype))
    return dq, dk, dv


def default_special_chunks(programs: int, query_blocks: int, device: torch.device) -> int:
    """Query chunks per special tile: enough programs for two per SM on CUDA, one chunk elsewhere
    (the interpreter runs programs one by one), never chunks of fewer than 4 query blocks."""
    if device.type != "cuda" or programs == 0:
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), query_blocks // 4))


class TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SepTilePlan,
                launch: Launch) -> torch.Tensor:
        out, lse = sep_forward(q, k, v, plan, launch)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.launch = plan, launch
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = sep_backward(grad_out, q, k, v, out, lse, ctx.plan, ctx.launch)
        return dq, dk, dv, None, None


def triton_sep_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_sep: torch.Tensor,
                         rule: SepRule, doc_ids: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, plan: Optional[SepTilePlan] = None,
                         blocks: Optional[Tuple[int, int]] = None, special_chunks: Optional[int] = None
                         ) -> torch.Tensor:
    """Sep-Attention, q [B, Hq, L, D], k/v [B, Hkv, L, D], is_sep [B, L] -> [B, Hq, L, D].

    ``plan`` (``triton_plan.build_tile_plan``) may be shared between layers; by default the plan
    of the most recent flags is reused. ``blocks`` = (BLOCK_M, BLOCK_N) overrides the tile sizes
    of all kernels (tests use small ones so short sequences cross many tiles); ``special_chunks``
    the query chunks of the special dK/dV pass (default: ``default_special_chunks``).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"triton Sep-Attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be [B, Hq, L, D] and [B, Hkv, L, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton Sep-Attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton Sep-Attention needs q, k, v of one dtype among fp32/fp16/bf16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if plan is None:
        plan = cached_tile_plan(is_sep, rule, doc_ids)
    launch = Launch(rule.n_local, q.shape[-1] ** -0.5 if scale is None else float(scale), blocks, special_chunks)
    q, k, v = (_kernel_layout(t, launch.tile_rows(q.shape[-1], q.dtype)) for t in (q, k, v))
    return TritonSepAttention.apply(q, k, v, plan, launch)

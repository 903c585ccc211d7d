"""Multi-process (gloo, localhost) training of a tiny Sep-Attention model on synthetic tokens, for
layout-equivalence tests and the parallelism benchmark. Workers are started with
``torch.multiprocessing`` (spawn) and report through files."""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB = 96
SEPARATORS = [3, 7, 11]
EOD = 1  # appears in the synthetic samples only for models that keep documents apart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_tree(**overrides) -> Dict[str, Any]:
    """Config tree of a 4-layer GQA model with sparse Sep-Attention (n_local 4 of seq 32)."""
    tree = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_kv_heads=2, seq_length=32,
        rotary_pct=0.5, make_vocab_size_divisible_by=8,
        attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4,
                                                   "separator_ids": SEPARATORS}},
        optimizer={"type": "adamw", "params": {"lr": 3.0e-3}},
        train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4, train_iters=5,
        lr_decay_style="cosine", warmup=0.2, min_lr=1.0e-4, clip_grad=1.0, seed=11, log_interval=1,
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def synthetic_samples(n: int, seq: int, seed: int = 0, eod: Optional[int] = None) -> torch.Tensor:
    """[n, seq + 1] tokens with ~15% separators so Sep-Attention's sparsity pattern matters (and ~6%
    ``eod`` tokens when given, so documents are short)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(12, VOCAB, (n, seq + 1), generator=gen)
    seps = torch.tensor(SEPARATORS)[torch.randint(0, len(SEPARATORS), (n, seq + 1), generator=gen)]
    tokens = torch.where(torch.rand(n, seq + 1, generator=gen) < 0.15, seps, tokens)
    if eod is not None:
        tokens = torch.where(torch.rand(n, seq + 1, generator=gen) < 0.06, eod, tokens)
    return tokens


def train_layout(tree: Dict[str, Any], steps: int, out_dir: Optional[str] = None, save_at: Optional[int] = None,
                 save_dir: Optional[str] = None, load: Optional[str] = None, eval_batches: int = 0,
                 timing: bool = False, layout=None, overflow_at: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
    # timing: only read by the spawned worker (installs the collective timer before the group starts)
    """Train in this process as the rank ``layout`` describes (default: one rank). Returns losses (per
    iteration, from the start of the run), step-1 gradients by name, eval losses, and timings.
    ``overflow_at`` {global rank: iteration}: that rank's first gradient gets an inf at that iteration
    (fp16 tests); fp16 configs run under CPU fp16 autocast, like the Trainer's."""
    from megatron.checkpointing import save_checkpoint
    from megatron.config import config_from_tree, config_to_tree
    from megatron.model import build_model
    from megatron.parallel import ParallelLayout
    from megatron.training.batches import global_batch_indices
    from megatron.training.lr_schedule import LRSchedule
    from megatron.training.optimizer import build_optimizer
    from megatron.training.resume import build_engine_and_resume

    cfg = config_from_tree(dict(tree, load=load) if load else tree)
    st = layout or ParallelLayout()
    torch.manual_seed(cfg.training.seed)
    micro, accum = cfg.training.train_micro_batch_size_per_gpu, cfg.training.gradient_accumulation_steps
    global_batch = micro * accum * st.dp_size
    eod = EOD if cfg.attention.sepllm.separate_documents else None
    model = build_model(cfg, VOCAB, SEPARATORS, eod, st)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule.from_config(cfg)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.float16)) if cfg.training.precision == "fp16"
                else contextlib.nullcontext)
    engine, manifest = build_engine_and_resume(cfg, model, optimizer, torch.device("cpu"), autocast)
    start = manifest["iteration"] if manifest else 0
    current = {"iteration": -1}
    target = (overflow_at or {}).get(dist.get_rank() if dist.is_initialized() else 0)
    if target is not None:
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * float("inf") if current["iteration"] == target else g)
    all_stats: List[Dict[str, float]] = []
    samples = synthetic_samples(global_batch * steps, cfg.model.seq_length, seed=5, eod=eod)
    losses: List[float] = []
    grads: Dict[str, torch.Tensor] = {}
    step_times: List[float] = []
    step_comm: List[float] = []
    model.train()
    for it in range(start, steps):
        idx = global_batch_indices(it * global_batch, global_batch, micro, accum, st.dp_size, st.dp_rank,
                                   len(samples))
        t0, c0 = time.perf_counter(), comm_seconds()
        current["iteration"] = it
        stats = engine.train_step([samples[i] for i in idx], schedule.lr_at(it + 1))
        all_stats.append(stats)
        step_times.append(time.perf_counter() - t0)
        step_comm.append(comm_seconds() - c0)
        losses.append(stats["loss"])
        if it == start:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if save_at is not None and it + 1 == save_at:
            save_checkpoint(save_dir, it + 1, model, engine.optimizer_state(),
                            {"consumed_samples": (it + 1) * global_batch}, config_to_tree(cfg))
    evals = []
    model.eval()
    for e in range(eval_batches):
        idx = global_batch_indices(e * global_batch, global_batch, micro, accum, st.dp_size, st.dp_rank,
                                   len(samples))
        evals.append(float(engine.eval_loss([samples[i] for i in idx])))
    tp_dims = {n: getattr(p, "tensor_parallel_dim", None) for n, p in model.named_parameters()}
    seq_parallel = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "stats": all_stats, "grads": grads, "weights": weights, "tp_dims": tp_dims,
            "sequence_parallel_params": seq_parallel, "evals": evals, "step_times": step_times, "step_comm": step_comm,
            "tp_rank": st.tp_rank, "pp_rank": st.pp_rank, "dp_rank": st.dp_rank, "cp_rank": st.cp_rank}


_COMM = {"seconds": 0.0}


def install_comm_timer() -> None:
    """Wrap torch.distributed collectives and point-to-point ops to accumulate their wall time
    (blocking calls; for async work the wait is timed)."""
    names = ["all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor",
             "send", "recv", "barrier"]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _COMM["seconds"] += time.perf_counter() - t0
            return out
        return wrapper

    for name in names:
        setattr(dist, name, timed(getattr(dist, name)))
    # Pipeline point-to-point: the schedules post isend/irecv and block in this helper (the time
    # includes waiting for the neighbour stage, i.e. the pipeline bubble).
    from torch.distributed.pipelining import schedules

    schedules._wait_batch_p2p = timed(schedules._wait_batch_p2p)


def comm_seconds() -> float:
    return _COMM["seconds"]


def _worker(rank: int, world: int, port: int, out_dir: str, kwargs: Dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if kwargs.get("timing"):
        install_comm_timer()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron.config import config_from_tree
        from megatron.parallel import layout_from_config

        layout = layout_from_config(config_from_tree(kwargs["tree"]), world, rank, groups=True)
        result = train_layout(**kwargs, layout=layout)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def run_layout(tree: Dict[str, Any], world: int, steps: int = 5, **kwargs) -> List[Dict[str, Any]]:
    """Spawn ``world`` gloo ranks for the layout in ``tree``; returns each rank's result."""
    from megatron.config import config_from_tree, validate_layout

    validate_layout(config_from_tree(tree), world)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), out, dict(tree=tree, steps=steps, **kwargs)),
                           nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def merge_grads(results: List[Dict[str, Any]], tied: bool = True, key: str = "grads") -> Dict[str, torch.Tensor]:
    """Full gradients (or ``key="weights"``: final weights) from the data- and context-parallel rank 0
    of every (tp, pp) shard."""
    by_stage: Dict[int, List[Dict[str, Any]]] = {}
    for r in results:
        if r["dp_rank"] == 0 and r.get("cp_rank", 0) == 0:
            by_stage.setdefault(r["pp_rank"], []).append(r)
    full = {}
    for stage in by_stage.values():
        stage.sort(key=lambda r: r["tp_rank"])
        for name in stage[0][key]:
            if tied and name == "lm_head.weight" and "embed.weight" not in stage[0][key]:
                continue  # the last stage's copy of the tied embedding
            dim = stage[0]["tp_dims"][name]
            parts = [r[key][name] for r in stage]
            full[name] = parts[0] if dim is None else torch.cat(parts, dim)
    return full

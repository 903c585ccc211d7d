"""Helpers for the fault-injection tests: a NaN injected at one step of a multi-rank (gloo) run of any
engine (dense, pipeline, ZeRO), and subprocess utilities (wait for a log line, process liveness)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_helpers import SEPARATORS, VOCAB, free_port, synthetic_samples


def poison_forward(model: torch.nn.Module, should_poison) -> None:
    """Make the embedding output NaN whenever ``should_poison()`` (first pipeline stage only)."""
    embed = getattr(model, "embed", None)
    if embed is not None:
        embed.register_forward_hook(lambda mod, inp, out: out * float("nan") if should_poison() else None)


def train_with_nan_step(tree: Dict[str, Any], steps: int, nan_step: int, layout) -> Dict[str, Any]:
    """Train as the rank ``layout`` describes; at ``nan_step`` the forward output is NaN. Returns per
    step the stats and whether any parameter changed."""
    from megatron.config import config_from_tree
    from megatron.model import build_model
    from megatron.training.batches import global_batch_indices
    from megatron.training.engines import build_engine
    from megatron.training.optimizer import build_optimizer

    cfg = config_from_tree(tree)
    st = layout
    torch.manual_seed(cfg.training.seed)
    micro, accum = cfg.training.train_micro_batch_size_per_gpu, cfg.training.gradient_accumulation_steps
    global_batch = micro * accum * st.dp_size
    model = build_model(cfg, VOCAB, SEPARATORS, None, st)
    engine = build_engine(cfg, model, build_optimizer(model, cfg), torch.device("cpu"))
    current = {"step": 0}
    poison_forward(model, lambda: current["step"] == nan_step)
    samples = synthetic_samples(global_batch * steps, cfg.model.seq_length, seed=5)
    stats, changed = [], []
    for it in range(steps):
        current["step"] = it + 1
        idx = global_batch_indices(it * global_batch, global_batch, micro, accum, st.dp_size, st.dp_rank,
                                   len(samples))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats.append(engine.train_step([samples[i] for i in idx], 1e-3))
        changed.append(any(not torch.equal(before[n], p) for n, p in model.named_parameters()))
    return {"stats": stats, "changed": changed}


def _worker(rank: int, world: int, port: int, out_dir: str, kwargs: Dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron.config import config_from_tree
        from megatron.parallel import layout_from_config

        layout = layout_from_config(config_from_tree(kwargs["tree"]), world, rank, groups=True)
        torch.save(train_with_nan_step(**kwargs, layout=layout), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_with_nan_step(tree: Dict[str, Any], world: int, steps: int, nan_step: int) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), out,
                                          dict(tree=tree, steps=steps, nan_step=nan_step)),
                           nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- subprocesses
def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float, seen: List[str]) -> str:
    """Read ``proc``'s stdout (text, line-buffered) until a line contains ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} within {timeout} s; output:\n{''.join(seen)[-3000:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pids: List[int], timeout: float) -> List[int]:
    """The pids still running after ``timeout`` seconds (empty: all gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def launched_ranks(deepy_pid: int, count: int, timeout: float = 60) -> List[int]:
    """[node agent (torchrun), rank 0, rank 1, ...] of a one-node deepy.py run."""
    from megatron.launch.signals import child_pids

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        torchrun = child_pids(deepy_pid)
        ranks = child_pids(torchrun[0]) if torchrun else []
        if len(ranks) == count:
            return torchrun + ranks
        time.sleep(0.2)
    raise AssertionError("ranks did not start")

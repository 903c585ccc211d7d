"""torch.distributed start-up from the launcher's environment (torchrun / deepspeed)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(backend: str = "auto") -> int:
    """Initialise the default process group when launched with several ranks; returns world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return dist.get_world_size() if dist.is_initialized() else 1
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shutdown_distributed() -> None:
    """End of a successful run: wait for every rank, then tear the process group down explicitly.
    Left to interpreter exit, gloo's worker threads can be destroyed while still joinable, which
    aborts the process (SIGABRT, "terminate called without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

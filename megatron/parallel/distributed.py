"""torch.distributed start-up from the launcher's environment (torchrun / deepspeed)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, List, TypeVar

import torch
import torch.distributed as dist

from megatron.errors import UserError

T = TypeVar("T")


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        # modulo: a scheduler may show each rank only its own GPU (srun --gpus-per-task=1)
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(backend: str = "auto", single_rank_group: bool = False, log=print) -> int:
    """Initialise the default process group when launched with several ranks; returns world size.

    ``single_rank_group``: create a one-rank group when launched alone (DeepSpeed's ZeRO needs a
    process group even then). ``nccl`` on a machine without CUDA falls back to gloo, with a message.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        return dist.get_world_size()
    if world == 1 and not single_rank_group:
        return 1
    if backend == "nccl" and not torch.cuda.is_available():
        if int(os.environ.get("RANK", "0")) == 0:
            log("distributed_backend nccl needs CUDA; using gloo on this machine")
        backend = "gloo"
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world == 1:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # what a launcher sets; DeepSpeed reads them
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return 1
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` runs on rank 0 only; every rank returns its result, or raises the UserError it
    raised (filesystem work that one rank does for all: a lock, a temporary directory)."""
    box: List[Any] = [None, None]  # [result, error]
    if rank() == 0:
        try:
            box[0] = decide()
        except UserError as e:
            box[1] = e
    if world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def shutdown_distributed() -> None:
    """End of a successful run: wait for every rank, then tear the process group down explicitly.
    Left to interpreter exit, gloo's worker threads can be destroyed while still joinable, which
    aborts the process (SIGABRT, "terminate called without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

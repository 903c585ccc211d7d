"""Under torch.distributed, rank 0 builds the sample index once; the other rank waits and loads it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron.data import IndexedDatasetBuilder

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import megatron.data.gpt_dataset as gpt
    from megatron.data import build_dataset

    prefix, cache, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    builds = []
    original = gpt.GPTDataset._build
    gpt.GPTDataset._build = lambda self, n: builds.append(n) or original(self, n)
    ds = build_dataset([prefix], None, 8, 3, 50, cache)
    np.save(out / f"samples{rank}.npy", np.stack([ds[i]["text"] for i in range(len(ds))]))
    (out / f"builds{rank}").write_text(str(len(builds)))
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_rank0_builds_index_once_and_ranks_agree(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as builder:
        for n in range(5, 40):
            builder.add_document(np.arange(n) % 50)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp_path / "ds"),
                                       str(tmp_path / "cache"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert (tmp_path / "builds0").read_text() == "1" and (tmp_path / "builds1").read_text() == "0"
    np.testing.assert_array_equal(np.load(tmp_path / "samples0.npy"), np.load(tmp_path / "samples1.npy"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3

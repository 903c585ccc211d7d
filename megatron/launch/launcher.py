"""Build launch commands: torchrun on one node, per-node torchrun (over ssh) or the deepspeed
launcher for several nodes listed in a DeepSpeed-format hostfile (``host slots=N``)."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from megatron.errors import LaunchError


@dataclass
class Host:
    name: str
    slots: int


@dataclass
class NodeCommand:
    node_rank: int
    host: str
    argv: List[str]  # the command run on that node
    remote: bool  # run through ssh

    def shell(self) -> str:
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        if not self.remote:
            return cmd
        inner = f"cd {shlex.quote(os.getcwd())} && {exported_env()}{cmd}"
        return f"ssh {shlex.quote(self.host)} {shlex.quote(inner)}"


NODE_AGENT = "megatron.launch.node_agent"
FORWARDED_ENV = ("PYTHONPATH", "WANDB_MODE", "WANDB_API_KEY", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")


def exported_env() -> str:
    parts = [f"{k}={shlex.quote(os.environ[k])}" for k in FORWARDED_ENV if k in os.environ]
    parts.append("SEPLLM_CONFIG_PRINTED=1")
    return "export " + " ".join(parts) + "; "


def usable_hostfile(path: Optional[str], log=print) -> Optional[str]:
    """``path`` when it is a file; a hostfile that does not exist means this node only, with one warning
    line, as DeepSpeed's runner (and so GPT-NeoX, whose example configs say ``hostfile: /mock_path``) does."""
    if path and not Path(path).is_file():
        log(f"warning: hostfile {path} not found; running on this node only (as DeepSpeed does)")
        return None
    return path


def parse_hostfile(path: str) -> List[Host]:
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    hosts: List[Host] = []
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        slots = 1
        for f in fields[1:]:
            if not f.startswith("slots="):
                raise LaunchError(f"{path}:{lineno}: expected 'HOST slots=N', got {raw.strip()!r}")
            try:
                slots = int(f[len("slots="):])
            except ValueError:
                raise LaunchError(f"{path}:{lineno}: slots must be an integer, got {raw.strip()!r}") from None
            if slots < 1:
                raise LaunchError(f"{path}:{lineno}: slots must be >= 1")
        if any(h.name == fields[0] for h in hosts):
            raise LaunchError(f"{path}:{lineno}: host {fields[0]!r} is listed twice")
        hosts.append(Host(fields[0], slots))
    if not hosts:
        raise LaunchError(f"{path}: no hosts listed")
    return hosts


def torchrun_argv(script: str, script_args: List[str], nproc: int, nnodes: int, node_rank: int,
                  master_addr: str, master_port: int) -> List[str]:
    # torchrun, run by our node agent: the ranks' failures end in one message and the right exit code
    return [sys.executable, "-m", NODE_AGENT, f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            script, *script_args]


def build_commands(script: str, script_args: List[str], num_procs: int, hostfile: Optional[str],
                   master_addr: Optional[str], master_port: int, launcher: str = "torchrun") -> List[NodeCommand]:
    if hostfile is None:
        if num_procs == 1:
            return [NodeCommand(0, "localhost", [sys.executable, script, *script_args], remote=False)]
        return [NodeCommand(0, "localhost", torchrun_argv(script, script_args, num_procs, 1, 0,
                                                          master_addr or "127.0.0.1", master_port), remote=False)]
    hosts = parse_hostfile(hostfile)
    master = master_addr or hosts[0].name
    if launcher == "deepspeed":
        argv = ["deepspeed", f"--hostfile={hostfile}", f"--master_addr={master}", f"--master_port={master_port}",
                f"--num_nodes={len(hosts)}", script, *script_args]
        return [NodeCommand(0, hosts[0].name, argv, remote=False)]
    if len({h.slots for h in hosts}) > 1:
        raise LaunchError(f"{hostfile}: torchrun needs the same slots on every host, got "
                          f"{', '.join(f'{h.name}={h.slots}' for h in hosts)}")
    local_names = {"localhost", "127.0.0.1"}
    return [NodeCommand(i, h.name, torchrun_argv(script, script_args, h.slots, len(hosts), i, master, master_port),
                        remote=h.name not in local_names)
            for i, h in enumerate(hosts)]


def world_size(num_procs: int, hostfile: Optional[str]) -> int:
    return sum(h.slots for h in parse_hostfile(hostfile)) if hostfile else num_procs

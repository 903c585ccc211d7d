"""Build launch commands: torchrun on one node, per-node torchrun (over ssh) or the deepspeed
launcher for several nodes listed in a DeepSpeed-format hostfile (``host slots=N``).

DeepSpeed's host selection applies as in its runner (and NeoX's ``include`` / ``exclude`` /
``num_nodes`` keys): ``include: "node-a@node-b:0,2"`` keeps those hosts (and, after ``:``, only those
slots of a host), ``exclude`` removes them, ``num_nodes: N`` keeps the first N hosts left. Chosen slots
become the node's ``CUDA_VISIBLE_DEVICES``."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from megatron.errors import LaunchError


@dataclass
class Host:
    name: str
    slots: int
    devices: Optional[List[int]] = None  # the slots chosen by include/exclude; None: all of them


@dataclass
class NodeCommand:
    node_rank: int
    host: str
    argv: List[str]  # the command run on that node
    remote: bool  # run through ssh
    env: Dict[str, str] = field(default_factory=dict)  # set for that node's command (CUDA_VISIBLE_DEVICES)

    def shell(self) -> str:
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        own = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())
        if not self.remote:
            return own + cmd
        inner = f"cd {shlex.quote(os.getcwd())} && {exported_env()}{own}{cmd}"
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


def parse_host_filter(spec: str, key: str) -> Dict[str, Optional[List[int]]]:
    """DeepSpeed's ``host1@host2:0,2`` syntax: host -> slot indices (None: the whole host)."""
    chosen: Dict[str, Optional[List[int]]] = {}
    for part in spec.split("@"):
        name, _, slots = part.strip().partition(":")
        if not name:
            raise LaunchError(f"{key}: expected 'HOST[:SLOT,SLOT]@HOST...', got {spec!r}")
        try:
            chosen[name] = sorted({int(x) for x in slots.split(",")}) if slots else None
        except ValueError:
            raise LaunchError(f"{key}: slots after ':' must be integers, got {part.strip()!r}") from None
    return chosen


def select_hosts(hosts: List[Host], include: Optional[str] = None, exclude: Optional[str] = None,
                 num_nodes: int = -1) -> List[Host]:
    """The hosts (and slots) a launch uses, by DeepSpeed's include / exclude / num_nodes rules."""
    if include and exclude:
        raise LaunchError("include and exclude are exclusive: name the hosts to use, or the ones to skip")
    by_name = {h.name: h for h in hosts}
    spec, key = (include, "include") if include else (exclude, "exclude")
    chosen = parse_host_filter(spec, key) if spec else {}
    for name, slots in chosen.items():
        if name not in by_name:
            raise LaunchError(f"{key}: host {name!r} is not in the hostfile ({', '.join(by_name)})")
        bad = [i for i in slots or [] if not 0 <= i < by_name[name].slots]
        if bad:
            raise LaunchError(f"{key}: {name} has slots 0-{by_name[name].slots - 1}, not {bad}")
    picked: List[Host] = []
    for h in hosts:
        every = list(range(h.slots))
        if include:
            if h.name not in chosen:
                continue
            devices = chosen[h.name] or every
        elif h.name in chosen:  # excluded: the whole host, or the slots listed
            devices = [] if chosen[h.name] is None else [i for i in every if i not in chosen[h.name]]
        else:
            devices = every
        if devices:
            picked.append(Host(h.name, len(devices), None if devices == every else devices))
    if num_nodes is not None and num_nodes > 0:
        if num_nodes > len(picked):
            raise LaunchError(f"num_nodes {num_nodes}: only {len(picked)} hosts are available")
        picked = picked[:num_nodes]
    if not picked:
        raise LaunchError(f"{key} leaves no host to run on")
    return picked


def launch_hosts(num_procs: int, hostfile: Optional[str], include: Optional[str] = None,
                 exclude: Optional[str] = None, num_nodes: int = -1) -> Optional[List[Host]]:
    """The hosts of a launch: the hostfile's (or this machine with ``num_procs`` slots when a filter
    names ``localhost``) after include/exclude/num_nodes; None: this machine, unfiltered."""
    if hostfile is None and not (include or exclude):
        return None
    hosts = parse_hostfile(hostfile) if hostfile else [Host("localhost", num_procs)]
    return select_hosts(hosts, include, exclude, num_nodes)


def torchrun_argv(script: str, script_args: List[str], nproc: int, nnodes: int, node_rank: int,
                  master_addr: str, master_port: int) -> List[str]:
    # torchrun, run by our node agent: the ranks' failures end in one message and the right exit code
    return [sys.executable, "-m", NODE_AGENT, f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            script, *script_args]


def build_commands(script: str, script_args: List[str], num_procs: int, hostfile: Optional[str],
                   master_addr: Optional[str], master_port: int, launcher: str = "torchrun",
                   include: Optional[str] = None, exclude: Optional[str] = None,
                   num_nodes: int = -1) -> List[NodeCommand]:
    hosts = launch_hosts(num_procs, hostfile, include, exclude, num_nodes)
    if hosts is None:
        if num_procs == 1:
            return [NodeCommand(0, "localhost", [sys.executable, script, *script_args], remote=False)]
        return [NodeCommand(0, "localhost", torchrun_argv(script, script_args, num_procs, 1, 0,
                                                          master_addr or "127.0.0.1", master_port), remote=False)]
    master = master_addr or ("127.0.0.1" if hostfile is None else hosts[0].name)
    if launcher == "deepspeed" and hostfile:  # its runner applies include/exclude/num_nodes itself
        selection = [f"--include={include}"] if include else [f"--exclude={exclude}"] if exclude else []
        argv = ["deepspeed", f"--hostfile={hostfile}", *selection, f"--master_addr={master}",
                f"--master_port={master_port}", f"--num_nodes={len(hosts)}", script, *script_args]
        return [NodeCommand(0, hosts[0].name, argv, remote=False)]
    if len({h.slots for h in hosts}) > 1:
        raise LaunchError(f"{hostfile or 'include/exclude'}: torchrun needs the same slots on every host, got "
                          f"{', '.join(f'{h.name}={h.slots}' for h in hosts)}")
    local_names = {"localhost", "127.0.0.1"}
    return [NodeCommand(i, h.name, torchrun_argv(script, script_args, h.slots, len(hosts), i, master, master_port),
                        remote=h.name not in local_names,
                        env={} if h.devices is None else {"CUDA_VISIBLE_DEVICES": ",".join(map(str, h.devices))})
            for i, h in enumerate(hosts)]


def world_size(num_procs: int, hostfile: Optional[str], include: Optional[str] = None,
               exclude: Optional[str] = None, num_nodes: int = -1) -> int:
    hosts = launch_hosts(num_procs, hostfile, include, exclude, num_nodes)
    return num_procs if hosts is None else sum(h.slots for h in hosts)

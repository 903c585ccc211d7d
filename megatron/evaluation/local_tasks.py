"""The local tasks shipped in ``megatron/evaluation/tasks/`` (lm-eval task YAML reading local JSONL files)
and the resolution of ``--tasks`` into what ``lm_eval.simple_evaluate`` takes.

The YAMLs name their data relative to the repository root (``data/eval/docs_*.jsonl``), so lm-eval's
own CLI can run them from there (``lm_eval --include_path megatron/evaluation/tasks ...``). eval.py
loads them as task dicts whose ``data_files`` point into ``task_data`` (default ``data/eval`` of the
repository), and checks that the files exist first. ``docs`` names all local tasks. Any other name is
an lm-eval task (``lambada_openai``, ``arc_easy``, ...; those download their data from the HF hub);
names starting with ``docs_`` are ours, so a typo there is reported without indexing lm-eval's tasks.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import yaml

from megatron.errors import InferenceError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TASK_DATA = REPO_ROOT / "data" / "eval"
LOCAL_GROUP = "docs"
BUILD_HINT = "build it with: python tools/datasets/build_eval_tasks.py --input data/docs/heldout.jsonl --out DIR"


def local_task_names() -> List[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def local_task_config(name: str, task_data: Union[str, Path]) -> Dict[str, Any]:
    """The task dict of local task ``name`` with its data files taken from ``task_data``."""
    config = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    resolved = {}
    for split, rel in files.items():
        path = Path(task_data) / Path(rel).name
        if not path.is_file():
            hint = BUILD_HINT.replace("DIR", str(task_data))
            raise InferenceError(f"local task {name}: data file '{path}' not found; {hint}")
        resolved[split] = str(path)
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": resolved}
    config.pop("tag", None)  # tags register groups in lm-eval's index; a task dict needs none
    return config


def split_task_names(tasks: Union[str, List[str]]) -> List[str]:
    items = tasks.split(",") if isinstance(tasks, str) else [t for part in tasks for t in part.split(",")]
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise InferenceError("no tasks given; pass --tasks (e.g. --tasks docs_lambada,docs_cloze or --tasks docs)")
    return names


def resolve_tasks(tasks: Union[str, List[str]], task_data: Union[str, Path, None] = None
                  ) -> Tuple[List[Union[str, Dict[str, Any]]], bool]:
    """(what simple_evaluate gets as ``tasks``, whether lm-eval's own task index is needed)."""
    local = local_task_names()
    task_data = Path(task_data) if task_data else DEFAULT_TASK_DATA
    out: List[Union[str, Dict[str, Any]]] = []
    needs_index = False
    for name in split_task_names(tasks):
        for member in (local if name == LOCAL_GROUP else [name]):
            if member in local:
                out.append(local_task_config(member, task_data))
            elif member.startswith(LOCAL_GROUP + "_"):  # our namespace: no need to index lm-eval's tasks
                close = difflib.get_close_matches(member, local, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise InferenceError(f"unknown local task {member}{hint} (local tasks: {', '.join(local)})")
            else:
                out.append(member)
                needs_index = True
    return out, needs_index


def make_task_manager(needs_index: bool):
    """lm-eval's TaskManager: with its index of standard tasks only when one is asked for (indexing
    takes seconds), else with none."""
    from lm_eval.tasks import TaskManager

    if needs_index:
        return TaskManager(include_path=str(TASK_DIR))
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def check_task_names(names: List[str], task_manager) -> None:
    """One clear error for names neither local nor known to lm-eval (instead of lm-eval's traceback)."""
    known = set(task_manager.all_tasks) | set(local_task_names()) | {LOCAL_GROUP}
    unknown = [n for n in names if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InferenceError(f"unknown task(s) {', '.join(unknown)}{hint} (local tasks: "
                             f"{', '.join(local_task_names())}, or '{LOCAL_GROUP}' for all of them)")

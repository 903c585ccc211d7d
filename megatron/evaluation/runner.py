"""Evaluate a checkpoint with lm-evaluation-harness: settings from YAML + command line, model loading with
attention overrides, the run, and the outputs (JSON, markdown table, optionally wandb).

What comes from where:
  * the checkpoint (``load:`` in the YAML, or ``--load``) gives the architecture and the weights, in any
    TP/PP layout (merged on load);
  * the tokenizer: ``--vocab-file``, else the YAML's ``vocab_file`` when the YAML sets it, else the
    checkpoint's config or a ``tokenizer/`` folder next to it;
  * the attention rule: the checkpoint's, except keys of the ``attention`` section the YAML sets
    (``attention: {sepllm: {mode: full}}`` evaluates a Sep-Attention model with full attention);
  * model keys the YAML sets that differ from the checkpoint are reported and not used.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron.checkpointing.checkpoint import checkpoint_at_step
from megatron.checkpointing.integrity import atomic_write_text
from megatron.config import config_from_tree, config_to_tree, load_config
from megatron.config.schema import Config
from megatron.errors import InferenceError
from megatron.inference.loading import load_model, load_tokenizer
from megatron.model.attention_plan import resolve_attention_plan
from megatron.model.gpt import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EvalSettings:
    load: str
    tasks: List[str]
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: int = 8
    output_path: Optional[str] = "eval_results"
    device: Optional[str] = None  # default: the rank's GPU, else cpu
    dtype: str = "fp32"
    task_data: Optional[str] = None  # folder of the local tasks' JSONL (default data/eval)
    max_length: Optional[int] = None  # default: the model's seq_length
    long_context: str = "stream"
    tokenizer_type: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    attention_overrides: Dict[str, Any] = field(default_factory=dict)  # dotted keys under attention.
    model_keys: Dict[str, Any] = field(default_factory=dict)  # model keys set in the YAML (checked only)
    seed: int = 1234
    bootstrap_iters: int = 10000
    log_samples: bool = False
    use_wandb: bool = False
    wandb_project: str = "sepllm-neox"
    wandb_group: Optional[str] = None
    wandb_mode: str = "offline"
    progress: bool = True


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def settings_from_config(paths: List[str], log: Callable[[str], None] = print, **cli: Any) -> EvalSettings:
    """EvalSettings from YAML files (as train.py reads them) and command-line values (None = unset)."""
    cfg, source = load_config(paths, log=lambda *_: None) if paths else (Config(), {})
    from_cli = cli.pop("load", None)
    load = from_cli or cfg.checkpoint.load
    if not load:
        where = ", ".join(paths) if paths else "the command line"
        raise InferenceError(f"no checkpoint to evaluate: set 'load:' in {where} or pass --load")
    if not from_cli and cfg.checkpoint.iteration is not None:  # NeoX's step to load
        load = checkpoint_at_step(load, cfg.checkpoint.iteration)
    tree = config_to_tree(cfg)
    tokenizer = {}
    if "vocab_file" in source:
        tokenizer = {"tokenizer_type": cfg.data.tokenizer_type, "vocab_file": cfg.data.vocab_file,
                     "merge_file": cfg.data.merge_file}
    lg = cfg.logging
    settings = EvalSettings(
        load=load, tasks=[], use_wandb=lg.use_wandb, wandb_project=lg.wandb_project, wandb_group=lg.wandb_group,
        wandb_mode=lg.wandb_mode, seed=cfg.training.seed, **tokenizer,
        attention_overrides={k: _get_dotted(cfg, k) for k in source if k.startswith("attention.")},
        model_keys={k: tree[k] for k in source if k in dataclasses.asdict(cfg.model)})
    for key, value in cli.items():
        if value is not None:
            if not hasattr(settings, key):
                raise TypeError(f"unknown eval setting {key}")
            setattr(settings, key, value)
    return settings


def override_attention(ckpt_cfg: Config, overrides: Dict[str, Any]) -> Config:
    """The checkpoint's config with the given dotted ``attention.*`` values replaced."""
    tree = config_to_tree(ckpt_cfg)
    for dotted, value in overrides.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_tree(tree)


def build_eval_model(settings: EvalSettings, log: Callable[[str], None] = print):
    """(model on its device, the config it was built from, tokenizer, checkpoint dir)."""
    tokenizer = load_tokenizer(settings.load, settings.tokenizer_type, settings.vocab_file, settings.merge_file)
    device = settings.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                 else "cpu")
    model, ckpt_cfg, ckpt = load_model(settings.load, tokenizer, "cpu")
    for key, value in settings.model_keys.items():
        have = config_to_tree(ckpt_cfg).get(key)
        if have != value:
            log(f"note: {key} = {value!r} in the config differs from the checkpoint's {have!r}; "
                "the checkpoint's architecture is used")
    cfg = ckpt_cfg
    if settings.attention_overrides:
        cfg = override_attention(ckpt_cfg, settings.attention_overrides)
        if cfg.attention != ckpt_cfg.attention:
            state = model.state_dict()
            eod = tokenizer.eod_id if cfg.attention.sepllm.separate_documents else model.eod_id
            plan = resolve_attention_plan(cfg.model, cfg.attention.sepllm, tokenizer)  # the overridden attention
            model = build_model(cfg, state["embed.weight"].shape[0], plan, eod)
            model.load_state_dict(state)
            log("attention overridden by the config: " + ", ".join(
                f"{k} {_get_dotted(ckpt_cfg, k)!r} -> {v!r}" for k, v in settings.attention_overrides.items()
                if _get_dotted(ckpt_cfg, k) != v))
    if settings.dtype not in DTYPES:
        raise InferenceError(f"dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    try:
        model = model.to(device=device, dtype=DTYPES[settings.dtype]).eval()
    except (RuntimeError, AssertionError) as err:  # e.g. a CUDA device on a machine without one
        raise InferenceError(f"cannot use device '{device}': {str(err).splitlines()[0]}") from None
    return model, cfg, tokenizer, ckpt


def make_lm(settings: EvalSettings, log: Callable[[str], None] = print):
    """The lm-eval LM for the settings' checkpoint, and a description of what runs."""
    model, cfg, tokenizer, ckpt = build_eval_model(settings, log)
    return lm_for_model(model, cfg, tokenizer, settings, str(ckpt), log)


def lm_for_model(model, cfg: Config, tokenizer, settings: EvalSettings, label: str,
                 log: Callable[[str], None] = print, distributed: bool = True):
    """The lm-eval LM over a whole model in eval mode (a loaded checkpoint, or a training run's model);
    ``distributed=False``: this process evaluates alone even inside a process group."""
    from megatron.evaluation.harness import SepLLMEvalLM
    from megatron.evaluation.scoring import Scorer, stream_cache_for

    max_length = settings.max_length or cfg.model.seq_length
    if hasattr(model, "pos_embed") and max_length > model.pos_embed.shape[0]:
        raise InferenceError(f"max_length {max_length} exceeds the model's {model.pos_embed.shape[0]} learned "
                             "positions")
    vocab = min(int(tokenizer.vocab_size), model.vocab_size)
    scorer = Scorer(model, vocab, max_length, pad_id=tokenizer.eod_id, batch_size=settings.batch_size,
                    long_context=settings.long_context)
    sep = cfg.attention.sepllm
    stream_cache = None
    if settings.long_context == "stream":
        try:
            stream_cache = dataclasses.asdict(stream_cache_for(model, max_length))
        except InferenceError as err:  # only requests longer than max_length need it
            log(f"note: no streaming cache for requests longer than {max_length}: {err}")
    info = {"checkpoint": label, "attention": {"mode": sep.mode, "n_init": sep.n_init, "n_local": sep.n_local,
                                               "impl": cfg.attention.impl},
            "max_length": max_length, "long_context": settings.long_context, "dtype": settings.dtype,
            "stream_cache": stream_cache}
    return SepLLMEvalLM(scorer, tokenizer, info, progress=settings.progress, distributed=distributed), info


def evaluate(settings: EvalSettings, log: Callable[[str], None] = print, lm=None) -> Optional[Dict[str, Any]]:
    """Run the tasks; the lm-eval results dict on rank 0 (None on other ranks)."""
    import lm_eval

    from megatron.evaluation.local_tasks import check_task_names, make_task_manager, resolve_tasks, split_task_names

    tasks, needs_index = resolve_tasks(settings.tasks, settings.task_data)
    task_manager = make_task_manager(needs_index)
    if needs_index:
        check_task_names(split_task_names(settings.tasks), task_manager)
    if lm is None:
        lm, _ = make_lm(settings, log)
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
            batch_size=settings.batch_size, device=str(lm.device),  # recorded in the results' config
            bootstrap_iters=settings.bootstrap_iters, log_samples=settings.log_samples, task_manager=task_manager,
            random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed)
    except ConnectionError as err:  # a standard task's data on an unreachable hub
        raise InferenceError(f"task data could not be fetched: {str(err).splitlines()[0]} (standard tasks download "
                             "from the HF hub; local tasks: --tasks docs)") from None


def output_files(settings: EvalSettings, results: Dict[str, Any]) -> Tuple[Path, Path]:
    """(JSON path, markdown path): --output-path FILE.json, or a folder with a timestamped name."""
    out = Path(settings.output_path or "eval_results")
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    ckpt = Path(results.get("config", {}).get("checkpoint", "model"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{ckpt.parent.name}_{ckpt.name}_{stamp}"
    return out / f"{name}.json", out / f"{name}.md"


def results_table(results: Dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_outputs(settings: EvalSettings, results: Dict[str, Any]) -> Tuple[Path, Path]:
    from lm_eval.utils import handle_non_serializable

    json_path, md_path = output_files(settings, results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    atomic_write_text(md_path, results_table(results) + "\n")
    return json_path, md_path


def scalar_metrics(results: Dict[str, Any]) -> Dict[str, float]:
    """{"task/metric": value} for every numeric metric (filters folded in: "acc,none" -> "acc")."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "alias":
                out[f"{task}/{name}" + (f"_{filt}" if filt not in ("", "none") else "")] = float(value)
    return out


def log_wandb(settings: EvalSettings, results: Dict[str, Any], log_dir: Path) -> None:
    os.environ.setdefault("WANDB_MODE", settings.wandb_mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=settings.wandb_project, group=settings.wandb_group, job_type="eval",
                     config={"load": settings.load, "tasks": settings.tasks, **results.get("config", {})},
                     dir=str(log_dir))
    run.log({f"eval/{k}": v for k, v in scalar_metrics(results).items()})
    run.finish()


def quiet_lm_eval(verbosity: str = "WARNING") -> None:
    """lm-eval logs every step at INFO; keep its warnings and errors only unless asked."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(getattr(logging, verbosity.upper(), logging.WARNING))

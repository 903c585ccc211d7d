"""Every check of a config, in one place: types against the schema, values and ranges, and the
parallel layout against a world size. Raises :class:`~megatron.errors.ConfigError` naming the file
and key."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, List, Optional

from megatron.config.schema import FLAT_GROUPS, NESTED_GROUPS, Config
from megatron.errors import ConfigError


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _group_cls(group: str):
    return typing.get_type_hints(Config)[group]


FLAT_KEYS = {name: group for group in FLAT_GROUPS for name in _fields(_group_cls(group))}
TOP_LEVEL_KEYS = sorted(list(FLAT_KEYS) + list(NESTED_GROUPS))


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    """Check ``value`` against type ``tp``; returns the value converted where safe (int -> float)."""
    def bad():
        return ConfigError(f"{where}: key '{key}' = {value!r} is not valid; expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: key '{key}' = {value!r} is not valid; expected "
                              f"{_type_name(tp)}{hint}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        if kt is object:
            return dict(value)
        return {_coerce(k, kt, f"{key} key", where): _coerce(v, vt, f"{key}.{k}", where)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build_dataclass(tp, value, key + ".", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 6e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is object:
        return value
    raise bad()


def build_dataclass(cls, values: Dict[str, Any], prefix: str = "", where: str = "config"):
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(key, known)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, where)
    return cls(**kwargs)


def config_from_tree(tree: Dict[str, Any], source: Optional[Dict[str, str]] = None, log=print) -> Config:
    """A validated Config from a YAML-shaped tree; ``source`` maps dotted keys to the file that set them."""
    source = source or {}
    groups: Dict[str, Dict[str, Any]] = {g: {} for g in FLAT_GROUPS + NESTED_GROUPS}
    for key, value in tree.items():
        where = source.get(key) or next((f for k, f in source.items() if k.startswith(key + ".")),
                                        "config")
        if key in NESTED_GROUPS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
            for sub in value:
                _check_nested_key(key, sub, value[sub], source)
            groups[key] = value
        elif key in FLAT_KEYS:
            groups[FLAT_KEYS[key]][key] = value
        else:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, TOP_LEVEL_KEYS)}")
    hints = typing.get_type_hints(Config)
    built = {}
    for group, values in groups.items():
        where = _where_for_group(group, values, source)
        built[group] = build_dataclass(hints[group], values, f"{group}." if group in NESTED_GROUPS
                                       else "", where)
    cfg = Config(**built)
    validate(cfg, source, log)
    return cfg


def _check_nested_key(section: str, key: str, value: Any, source: Dict[str, str]):
    """Report the file for an unknown key inside a nested section before building."""
    cls = typing.get_type_hints(Config)[section]
    known = _fields(cls)
    where = source.get(f"{section}.{key}", "config")
    if key not in known:
        raise ConfigError(f"{where}: unknown key '{section}.{key}'{_suggest(key, known)}")
    sub_cls = typing.get_type_hints(cls)[key]
    if dataclasses.is_dataclass(sub_cls) and isinstance(value, dict):
        sub_known = _fields(sub_cls)
        for sub in value:
            if sub not in sub_known:
                w = source.get(f"{section}.{key}.{sub}", where)
                raise ConfigError(f"{w}: unknown key '{section}.{key}.{sub}'{_suggest(sub, sub_known)}")


def _where_for_group(group: str, values: Dict[str, Any], source: Dict[str, str]) -> str:
    files = {source.get(k) for k in values} | {f for k, f in source.items() if k.startswith(group + ".")}
    files.discard(None)
    return ", ".join(sorted(files)) if files else "config"


def _err(source: Dict[str, str], key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source.get(key, 'config')}: {msg}")


def validate(cfg: Config, source: Optional[Dict[str, str]] = None, log=print) -> None:
    """Range and consistency checks that do not depend on the world size."""
    src = source or {}
    m, sep, tr, par = cfg.model, cfg.attention.sepllm, cfg.training, cfg.parallel
    positive = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads, "seq_length": m.seq_length,
        "train_micro_batch_size_per_gpu": tr.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps, "train_iters": tr.train_iters,
        "model_parallel_size": par.model_parallel_size, "log_interval": cfg.logging.log_interval,
        "context_parallel_size": par.context_parallel_size,
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
    }
    for key, value in positive.items():
        if value < 1:
            raise _err(src, key, f"key '{key}' = {value} is not valid; expected an integer >= 1")
    if par.pipe_parallel_size == 0:
        log("config: pipe_parallel_size = 0 read as 1 (no pipeline split)")
        par.pipe_parallel_size = 1
    if par.pipe_parallel_size < 0:
        raise _err(src, "pipe_parallel_size", "key 'pipe_parallel_size' must be >= 1")
    if m.hidden_size % m.num_attention_heads:
        raise _err(src, "hidden_size", f"hidden_size {m.hidden_size} must be divisible by "
                   f"num_attention_heads {m.num_attention_heads}")
    kv = m.kv_heads
    if kv < 1 or m.num_attention_heads % kv:
        raise _err(src, "num_kv_heads", f"num_attention_heads {m.num_attention_heads} must be a "
                   f"multiple of num_kv_heads {kv}")
    if not 0.0 < m.rotary_pct <= 1.0:
        raise _err(src, "rotary_pct", f"rotary_pct = {m.rotary_pct}; expected 0 < rotary_pct <= 1")
    head_dim = m.hidden_size // m.num_attention_heads
    if m.pos_emb == "rotary" and int(head_dim * m.rotary_pct) % 2:
        raise _err(src, "rotary_pct", f"rotary dims = head_dim {head_dim} * rotary_pct {m.rotary_pct}"
                   " must be even")
    if sep.n_init < 0 or sep.n_local < 1 or sep.interval < 1:
        raise ConfigError(f"{src.get('attention.sepllm.n_local', 'config')}: attention.sepllm needs "
                          f"n_init >= 0, n_local >= 1, interval >= 1 (got n_init={sep.n_init}, "
                          f"n_local={sep.n_local}, interval={sep.interval})")
    for layer in sep.full_attention_layers:
        if not -m.num_layers <= layer < m.num_layers:
            raise _err(src, "attention.sepllm.full_attention_layers",
                       f"attention.sepllm.full_attention_layers has {layer}; expected a layer index "
                       f"in [-{m.num_layers}, {m.num_layers - 1}]")
    if tr.warmup < 0 or tr.warmup > 1:
        raise _err(src, "warmup", f"warmup = {tr.warmup}; expected a fraction in [0, 1]")
    if tr.min_lr > cfg.optimizer.params.lr:
        raise _err(src, "min_lr", f"min_lr {tr.min_lr} is larger than optimizer lr "
                   f"{cfg.optimizer.params.lr}")
    split = cfg.data.split.replace("/", ",").split(",")
    try:
        if len(split) > 3 or any(float(s) < 0 for s in split) or sum(float(s) for s in split) <= 0:
            raise ValueError
    except ValueError:
        raise _err(src, "split", f"split = {cfg.data.split!r}; expected up to 3 non-negative "
                   "weights like '969,30,1'") from None


def validate_model_split(cfg: Config, tp: int, pp: int, virtual_stages: int = 1) -> None:
    """The model divides over ``tp`` tensor-parallel and ``pp`` x ``virtual_stages`` pipeline parts."""
    m = cfg.model
    if m.num_attention_heads % tp:
        raise ConfigError(f"num_attention_heads {m.num_attention_heads} is not divisible by "
                          f"model_parallel_size {tp}")
    if m.kv_heads % tp:
        raise ConfigError(f"num_kv_heads {m.kv_heads} is not divisible by model_parallel_size {tp}")
    if m.num_layers % (pp * virtual_stages):
        what = f"pipe_parallel_size {pp}" + (f" x virtual_pipe_stages {virtual_stages}" if virtual_stages > 1 else "")
        raise ConfigError(f"num_layers {m.num_layers} is not divisible by {what}")


def _validate_virtual_stages(cfg: Config) -> None:
    par = cfg.parallel
    pp, v = par.pipe_parallel_size, par.virtual_pipe_stages
    if v < 1:
        raise ConfigError(f"virtual_pipe_stages {v} must be >= 1")
    if v > 1 and pp == 1:
        raise ConfigError(f"virtual_pipe_stages {v} needs pipe_parallel_size > 1")
    if par.pipe_schedule == "interleaved_1f1b" and pp > 1 and v == 1:
        raise ConfigError("pipe_schedule 'interleaved_1f1b' needs virtual_pipe_stages > 1")
    if v > 1 and par.pipe_schedule == "gpipe":
        raise ConfigError("pipe_schedule 'gpipe' does not support virtual_pipe_stages > 1; "
                          "use 'interleaved_1f1b'")


def _validate_schedule(cfg: Config) -> None:
    par, accum = cfg.parallel, cfg.training.gradient_accumulation_steps
    pp, v = par.pipe_parallel_size, par.virtual_pipe_stages
    if pp > 1 and v == 1 and par.pipe_schedule != "gpipe" and accum < pp:
        raise ConfigError(f"gradient_accumulation_steps {accum} (the pipeline's micro-batches) must be >= "
                          f"pipe_parallel_size {pp} for the 1F1B schedule")
    if v > 1 and accum % max(1, accum // pp):
        raise ConfigError(f"interleaved 1F1B needs gradient_accumulation_steps {accum} to be a multiple of "
                          f"{max(1, accum // pp)} (its rounds of pipe_parallel_size micro-batches)")
    stage = par.zero_optimization.stage
    if stage not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage {stage} is not supported; use 0, 1 or 2")
    if stage > 0 and pp > 1:
        raise ConfigError(f"zero_optimization.stage {stage} with pipe_parallel_size {pp} is not supported; "
                          "use stage 0 (flat data-parallel all-reduce) with pipelining")


# Attention kernels that run under context parallelism (megatron/parallel/context_parallel.py).
CONTEXT_PARALLEL_IMPLS = ("auto", "reference", "compact", "sdpa")


def validate_context_parallel(cfg: Config) -> None:
    """Context parallelism: the sequence splits into 2 x cp equal segments (balanced split), each
    rank's chunk splits over tp under sequence parallelism, and the attention kernel has a CP form."""
    par, m = cfg.parallel, cfg.model
    cp, tp = par.context_parallel_size, par.model_parallel_size
    if cp == 1:
        return
    if m.seq_length % (2 * cp):
        raise ConfigError(f"context_parallel_size {cp}: seq_length {m.seq_length} must be divisible by "
                          f"2 x context_parallel_size = {2 * cp} (each rank holds two of 2 x cp segments)")
    if par.sequence_parallel and tp > 1 and (m.seq_length // cp) % tp:
        raise ConfigError(f"sequence_parallel with context_parallel_size {cp}: each rank's {m.seq_length // cp} "
                          f"positions must be divisible by model_parallel_size {tp}")
    impl = cfg.attention.impl
    if impl not in CONTEXT_PARALLEL_IMPLS:
        raise ConfigError(f"attention.impl {impl!r} does not run with context_parallel_size {cp}; use one of "
                          f"{', '.join(CONTEXT_PARALLEL_IMPLS)}")


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check the parallel layout against the world size; returns the data-parallel size."""
    par, m = cfg.parallel, cfg.model
    tp, pp, cp = par.model_parallel_size, par.pipe_parallel_size, par.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by model_parallel_size {tp} x "
                          f"pipe_parallel_size {pp}" + (f" x context_parallel_size {cp}" if cp > 1 else ""))
    validate_model_split(cfg, tp, pp)
    if par.sequence_parallel and tp > 1 and m.seq_length % tp:
        raise ConfigError(f"sequence_parallel: seq_length {m.seq_length} is not divisible by "
                          f"model_parallel_size {tp}")
    validate_context_parallel(cfg)
    dp = world_size // (tp * pp * cp)
    tb = cfg.training.train_batch_size
    derived = cfg.training.train_micro_batch_size_per_gpu * cfg.training.gradient_accumulation_steps * dp
    if tb is not None and tb != derived:
        raise ConfigError(f"train_batch_size {tb} != train_micro_batch_size_per_gpu x "
                          f"gradient_accumulation_steps x data-parallel size ({derived})")
    return dp


def validate_launch(cfg: Config, world_size: int) -> int:
    """Everything a launch needs checked before any process group starts: the pipeline schedule and
    ZeRO settings, then the layout against the world size. Returns the data-parallel size."""
    _validate_virtual_stages(cfg)
    par = cfg.parallel
    validate_model_split(cfg, 1, par.pipe_parallel_size, par.virtual_pipe_stages)
    _validate_schedule(cfg)
    return validate_layout(cfg, world_size)

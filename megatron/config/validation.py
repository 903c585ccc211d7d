"""Every check of a config, in one place: types against the schema, values and ranges, and the
parallel layout against a world size.

:func:`config_from_tree` translates NeoX / SepLLM spellings (``neox_compat.py``), then checks every
key and reports every unknown key, wrong type and unsupported feature at once, each as one
``file:line: message`` line of one :class:`~megatron.errors.ConfigError`; range checks follow, also
all at once. Launch checks raise on the first problem. No check changes the config it reads: what
NeoX's spellings mean (``pipe_parallel_size: 0``, ``fp16.enabled``) is decided in the translation."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.attention.impls import CONTEXT_PARALLEL_EXCLUDES, CONTEXT_PARALLEL_IMPLS, KERNELS, device_problem
from megatron.config.monitoring_checks import check_monitoring
from megatron.config.neox_compat import BY_KEY, translate
from megatron.config.problems import UNKNOWN_ORDER, Problems, suggest
from megatron.config.schema import FLAT_GROUPS, NESTED_GROUPS, Config, mlp_sizes
from megatron.errors import ConfigError

Locate = Callable[[str], Tuple[str, Tuple[int, int]]]


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _group_cls(group: str):
    return typing.get_type_hints(Config)[group]


FLAT_KEYS = {name: group for group in FLAT_GROUPS for name in _fields(_group_cls(group))}
TOP_LEVEL_KEYS = sorted(list(FLAT_KEYS) + list(NESTED_GROUPS))


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


class _Bad(Exception):
    """A value that does not fit its key's type; the message has no location."""


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against type ``tp``; returns the value converted where safe (int -> float)."""
    def bad():
        return _Bad(f"key '{key}' = {value!r} is not valid; expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices], aliases=False) if isinstance(value, str) else ""
            raise _Bad(f"key '{key}' = {value!r} is not valid; expected {_type_name(tp)}{hint}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        if kt is object:
            return dict(value)

        def dict_key(k):
            if kt is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # JSON (a checkpoint's manifest) writes integer keys as strings
            return _coerce(k, kt, f"{key} key")

        return {dict_key(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
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


def _nowhere(_key: str) -> Tuple[str, Tuple[int, int]]:
    return "config", UNKNOWN_ORDER


def build_dataclass(cls, values: Dict[str, Any], prefix: str = "", locate: Locate = _nowhere,
                    problems: Optional[Problems] = None):
    """``cls`` from ``values``; each unknown key or bad value is added to ``problems`` (raised at once
    when no collector is given) and the field keeps its default."""
    own = problems is None
    problems = Problems() if own else problems
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        where, order = locate(prefix + key)
        if key not in known:
            problems.add(where, f"unknown key '{prefix}{key}'{suggest(key, known, aliases=False)}", order)
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.", locate, problems)
            else:
                problems.add(where, f"key '{prefix}{key}' must be a mapping, got {value!r}", order)
            continue
        try:
            kwargs[key] = _coerce(value, tp, prefix + key)
        except _Bad as bad:
            problems.add(where, str(bad), order)
    if own:
        problems.raise_if_any()
    return cls(**kwargs)


def config_from_tree(tree: Dict[str, Any], source: Optional[Dict[str, str]] = None, log=print,
                     lines: Optional[Dict[Tuple[str, str], int]] = None, files: Optional[List[str]] = None
                     ) -> Config:
    """A validated Config from a YAML-shaped tree (ours, or NeoX's / the SepLLM reference's keys);
    ``source`` maps dotted keys to the file that set them, ``lines`` (file, dotted key) to the line."""
    problems = Problems()
    ctx = translate(tree, source or {}, lines or {}, files or [], problems, log)
    ours, where, _ = ctx.tree()
    groups: Dict[str, Dict[str, Any]] = {g: {} for g in FLAT_GROUPS + NESTED_GROUPS}
    for key, value in ours.items():
        if key in NESTED_GROUPS:
            if isinstance(value, dict):
                groups[key] = value
            else:
                problems.add(*_at(ctx.locate(key), f"key '{key}' must be a mapping, got {value!r}"))
        elif key in FLAT_KEYS:
            groups[FLAT_KEYS[key]][key] = value
        else:
            hint = suggest(key, TOP_LEVEL_KEYS + list(BY_KEY))
            problems.add(*_at(ctx.locate(key), f"unknown key '{key}'{hint}"))
    hints = typing.get_type_hints(Config)
    built = {group: build_dataclass(hints[group], values, f"{group}." if group in NESTED_GROUPS else "",
                                    ctx.locate, problems)
             for group, values in groups.items()}
    problems.raise_if_any()
    cfg = Config(**built)
    validate(cfg, where)
    return cfg


def _at(located: Tuple[str, Tuple[int, int]], message: str):
    return located[0], message, located[1]


def validate(cfg: Config, source: Optional[Dict[str, str]] = None) -> None:
    """Range and consistency checks that do not depend on the world size; all problems at once.
    ``source`` maps our dotted keys to where they were set. Reads ``cfg`` only: NeoX's spellings
    (``pipe_parallel_size: 0``, the ``fp16`` section) were translated before it was built."""
    src = source or {}
    problems = Problems()

    def err(key: str, msg: str) -> None:
        problems.add(src.get(key, "config"), msg)

    _check_model(cfg, err)
    _check_training(cfg, err)
    _check_fp16(cfg, err)
    _check_generation(cfg, err)
    check_monitoring(cfg, err)
    problems.raise_if_any()


def _check_model(cfg: Config, err) -> None:
    m, sep, tr, par = cfg.model, cfg.attention.sepllm, cfg.training, cfg.parallel
    positive = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads, "seq_length": m.seq_length,
        "train_micro_batch_size_per_gpu": tr.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps, "train_iters": tr.train_iters,
        "model_parallel_size": par.model_parallel_size, "log_interval": cfg.logging.log_interval,
        "context_parallel_size": par.context_parallel_size,
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by, "mlp_multiple_of": m.mlp_multiple_of,
        "max_skipped_steps": tr.max_skipped_steps, "pipe_parallel_size": par.pipe_parallel_size,
    }
    bad = {key for key, value in positive.items() if value < 1}
    for key in sorted(bad, key=list(positive).index):
        err(key, f"key '{key}' = {positive[key]} is not valid; expected an integer >= 1")
    if bad & {"hidden_size", "num_attention_heads", "num_layers"}:
        return
    if m.hidden_size % m.num_attention_heads:
        err("hidden_size", f"hidden_size {m.hidden_size} must be divisible by "
                           f"num_attention_heads {m.num_attention_heads}")
        return
    kv = m.kv_heads
    if kv < 1 or m.num_attention_heads % kv:
        err("num_kv_heads", f"num_attention_heads {m.num_attention_heads} must be a multiple of num_kv_heads {kv}")
    if not 0.0 < m.rotary_pct <= 1.0:
        err("rotary_pct", f"rotary_pct = {m.rotary_pct}; expected 0 < rotary_pct <= 1")
    elif m.pos_emb == "rotary" and int(m.head_dim * m.rotary_pct) % 2:
        err("rotary_pct", f"rotary dims = head_dim {m.head_dim} * rotary_pct {m.rotary_pct} must be even")
    _check_mlp(m, err)
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            err(key, f"{key} = {getattr(m, key)}; expected a probability in [0, 1)")
    _check_positions(cfg, err)
    # The bounds of rule_problem in attention/sepllm_rule.py, a layer above config (so not imported);
    # tests/test_kernel_edge_cases.py checks that both accept the same settings.
    why_one = " (the local window counts the query itself)"
    for key, value, least in (("n_init", sep.n_init, 0), ("n_local", sep.n_local, 1), ("interval", sep.interval, 1)):
        if value < least:
            err(f"attention.sepllm.{key}", f"attention.sepllm.{key} = {value}; expected {key} >= {least}"
                                           + (why_one if key == "n_local" else ""))
    for layer, window in sep.layer_n_local.items():
        if window < 1:
            err("attention.sepllm.layer_n_local", f"attention.sepllm.layer_n_local gives layer {layer} window "
                                                  f"{window}; expected n_local >= 1{why_one}")
    for layer in sep.full_attention_layers:
        if not -m.num_layers <= layer < m.num_layers:
            err("attention.sepllm.full_attention_layers",
                f"attention.sepllm.full_attention_layers has {layer}; expected a layer index "
                f"in [-{m.num_layers}, {m.num_layers - 1}]")
    _check_attention_dropout(cfg, err)


def _check_mlp(m, err) -> None:
    if m.ffn_hidden_size is not None and m.intermediate_size is not None:
        err("ffn_hidden_size", "set intermediate_size (NeoX's meaning) or ffn_hidden_size (the literal "
                               "per-branch width), not both")
        return
    if (m.ffn_hidden_size or 1) < 1 or (m.intermediate_size or 1) < 1:
        err("intermediate_size", "MLP widths must be >= 1")
        return
    width_in, width_out = mlp_sizes(m)
    if m.intermediate_size is None:
        return  # the default width: each branch is the output projection's width, whatever NeoX rounds
    if m.activation == "swiglu" and width_in != 2 * width_out:
        err("intermediate_size",
            f"NeoX's rule gives this gated MLP an input projection of {width_in} but branches of {width_out} "
            f"(intermediate_size {m.intermediate_size}, mlp_multiple_of "
            f"{m.mlp_multiple_of}); NeoX cannot build it either. Set mlp_multiple_of (e.g. 256) or "
            "ffn_hidden_size (the literal per-branch width)")
    elif m.activation != "swiglu" and width_in != width_out:
        err("intermediate_size", f"NeoX's rule rounds this MLP to {width_in} in and {width_out} out "
                                 f"(mlp_multiple_of {m.mlp_multiple_of}); NeoX cannot build it either")


def _check_attention_dropout(cfg: Config, err) -> None:
    """Attention dropout on Sep-Attention layers needs a kernel whose row (attention/impls.py) has it;
    dense (full) layers always have it."""
    m, att, sep = cfg.model, cfg.attention, cfg.attention.sepllm
    if m.attention_dropout == 0 or KERNELS[att.impl].dropout:
        return
    full = {i % m.num_layers for i in sep.full_attention_layers}
    sparse_layers = [] if sep.mode == "full" else [i for i in range(m.num_layers) if i not in full]
    if sparse_layers:
        kernel = {"auto": "auto (flex on GPU, compact on CPU)"}.get(att.impl, att.impl)
        err("attention_dropout", f"attention_dropout {m.attention_dropout} is not implemented by "
                                 f"attention.impl {kernel} for the {sep.mode} layers; use impl 'reference' "
                                 "or set attention_dropout: 0")


def _check_training(cfg: Config, err) -> None:
    tr, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    if tr.warmup < 0 or tr.warmup > 1:
        err("warmup", f"warmup = {tr.warmup}; expected a fraction in [0, 1]")
    if tr.warmup_iters is not None and tr.warmup_iters < 0:
        err("warmup_iters", f"warmup_iters = {tr.warmup_iters}; expected an integer >= 0")
    if tr.min_lr > cfg.optimizer.params.lr:
        err("min_lr", f"min_lr {tr.min_lr} is larger than optimizer lr {cfg.optimizer.params.lr}")
    if cfg.data.data_path and cfg.data.train_data_paths:
        err("train_data_paths", "set data_path (one dataset, divided by split) or train/valid/test_data_paths, "
                                "not both (NeoX rejects both too; 'data_path: null' in a later file unsets it)")
    split = cfg.data.split.replace("/", ",").split(",")
    try:
        if len(split) > 3 or any(float(s) < 0 for s in split) or sum(float(s) for s in split) <= 0:
            raise ValueError
    except ValueError:
        err("split", f"split = {cfg.data.split!r}; expected up to 3 non-negative weights like '969,30,1'")
    if tr.fp16.enabled != (tr.precision == "fp16"):  # the translation (compat_groups.precision) sets both
        err("fp16", f"fp16.enabled is {str(tr.fp16.enabled).lower()} but precision is {tr.precision}; "
                    "set precision: fp16 with enabled: true, or neither")
    if any(i < 0 for i in ck.extra_save_iters):
        err("extra_save_iters", f"extra_save_iters {ck.extra_save_iters} has negative iterations")
    for key in ("kv_ratio_interval", "peak_theoretical_tflops"):
        value = getattr(lg, key)
        if value is not None and value <= 0:
            err(key, f"{key} = {value}; expected a positive number")
    for key in ("num_gpus", "global_num_gpus", "master_port"):
        value = getattr(cfg.launch, key)
        if value is not None and value < 1:
            err(key, f"{key} = {value}; expected an integer >= 1")
    if cfg.launch.num_nodes == 0 or cfg.launch.num_nodes < -1:
        err("num_nodes", f"num_nodes = {cfg.launch.num_nodes}; expected -1 (all hosts) or an integer >= 1")
    if cfg.launch.include and cfg.launch.exclude:
        err("include", "include and exclude are exclusive: name the hosts to use, or the ones to skip")
    if cfg.data.num_workers < 0:
        err("num_workers", f"num_workers = {cfg.data.num_workers}; expected an integer >= 0")


def _check_generation(cfg: Config, err) -> None:
    g = cfg.generation
    for key in ("maximum_tokens", "num_samples", "cache_size"):
        if getattr(g, key) < 1:
            err(key, f"{key} = {getattr(g, key)}; expected an integer >= 1")
    for key in ("top_k", "init_cache_size", "sep_cache_size", "local_size"):
        if getattr(g, key) < 0:
            err(key, f"{key} = {getattr(g, key)}; expected an integer >= 0")
    if g.temperature < 0:
        err("temperature", f"temperature = {g.temperature}; expected a number >= 0")
    if not 0 <= g.top_p <= 1:
        err("top_p", f"top_p = {g.top_p}; expected a probability in [0, 1] (0 = off)")
    if g.prefill_chunk is not None and g.prefill_chunk < 1:
        err("prefill_chunk", f"prefill_chunk = {g.prefill_chunk}; expected an integer >= 1")
    if not g.prompt_end:
        err("prompt_end", "prompt_end is empty; expected the text that ends a prompt (NeoX: '\\n')")


# Packages that an accepted key needs, checked before launch.
def _check_optional_packages(cfg: Config) -> None:
    import importlib.util

    if cfg.logging.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"tensorboard_dir '{cfg.logging.tensorboard_dir}' needs the tensorboard package: "
                          "pip install -e '.[tensorboard]' (or remove tensorboard_dir)")


def deepspeed_fp16_device() -> Tuple[str, bool]:
    """DeepSpeed's accelerator on this machine, and whether it runs fp16: DeepSpeed's own answer (what
    ``DeepSpeedEngine._do_sanity_check`` asks), i.e. CUDA from compute capability 7.0, a CPU only
    where oneDNN has fp16 (AVX512-FP16 or AMX-FP16)."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # DeepSpeed's "Setting accelerator to CPU" on first use
    try:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    finally:
        logging.disable(previous)
    return accelerator.device_name(), bool(accelerator.is_fp16_supported())


def zero_fp16_device_problem(cfg: Config) -> Optional[str]:
    """Why fp16 under ZeRO cannot run on this machine (DeepSpeed has no fp16 here), or None. Without ZeRO
    our own loss scaler runs fp16 on any device."""
    stage = cfg.parallel.zero_optimization.stage
    if stage == 0 or cfg.training.precision != "fp16":
        return None
    device, has_fp16 = deepspeed_fp16_device()
    if has_fp16:
        return None
    return (f"precision fp16 with zero_optimization.stage {stage}: DeepSpeed has no fp16 on this machine's {device} "
            "(it needs CUDA, or a CPU with AVX512-FP16/AMX-FP16); use precision bf16 or fp32, or "
            "zero_optimization.stage 0 (fp16 with our own loss scaler)")


def _having(capability: str) -> str:
    return ", ".join(f"'{name}'" for name, spec in KERNELS.items() if getattr(spec, capability))


def _check_positions(cfg: Config, err) -> None:
    """ALiBi, BiPE and documents: what the attention impl can run (attention/impls.py), checked before launch."""
    m, impl = cfg.model, cfg.attention.impl
    spec = KERNELS[impl]
    if cfg.attention.sepllm.separate_documents and not spec.separate_documents:
        err("attention.sepllm.separate_documents", f"attention.impl '{impl}' does not implement "
            f"attention.sepllm.separate_documents; use one of {_having('separate_documents')}")
    if m.pos_emb == "alibi" and not spec.alibi:
        err("attention.impl", f"attention.impl '{impl}' takes no ALiBi bias; use one of {_having('alibi')}")
    if not m.bipe:
        return
    if m.pos_emb not in ("rotary", "alibi"):
        err("bipe", f"bipe: true needs pos_emb 'rotary' or 'alibi' (the segment-level encoding), "
                    f"got pos_emb '{m.pos_emb}'")
    if m.bipe_separator_ids is not None and not m.bipe_separator_ids:
        err("bipe_separator_ids", "bipe_separator_ids is empty; give the token ids that end a segment, or leave "
                                  "it unset to use the Sep-Attention separators")
    if m.pos_emb == "alibi" and spec.alibi and not spec.alibi_bipe:
        err("attention.impl", f"attention.impl '{impl}' cannot run ALiBi-BiPE (its ALiBi is token-level only); "
                              f"use one of {_having('alibi_bipe')}")


def _check_fp16(cfg: Config, err) -> None:
    """The loss-scaling settings, whatever the precision (``precision`` and the ``fp16`` section were
    reconciled, NeoX's way, by ``compat_groups.precision``); the scale's upper bound only matters in fp16."""
    tr = cfg.training
    fp16 = tr.fp16
    if fp16.loss_scale < 0 or fp16.min_loss_scale <= 0 or fp16.loss_scale_window < 1 or fp16.hysteresis < 1:
        err("fp16", f"fp16 needs loss_scale >= 0 (0 = dynamic), min_loss_scale > 0, loss_scale_window >= 1 and "
                    f"hysteresis >= 1 (got {fp16})")
    if fp16.initial_scale_power < 0 or (tr.precision == "fp16" and fp16.initial_scale_power > 64):
        err("fp16", f"fp16.initial_scale_power = {fp16.initial_scale_power}; expected 0..64")


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
    used = {"pos_emb: alibi": m.pos_emb == "alibi", "bipe": m.bipe, "attention_dropout": m.attention_dropout > 0}
    unsupported = [what for what in CONTEXT_PARALLEL_EXCLUDES if used[what]]
    if unsupported:
        raise ConfigError(f"context_parallel_size {cp} does not support {', '.join(unsupported)} (the exchanged "
                          "key layout has no token-distance bias and no dropout); use context_parallel_size 1")


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
    """Everything a launch needs checked before any process group starts: optional packages, the
    pipeline schedule and ZeRO settings, then the layout against the world size (what the ranks' device
    can run is ``validate_device``'s: the launcher may run on another machine). Returns the
    data-parallel size."""
    _check_optional_packages(cfg)
    _validate_virtual_stages(cfg)
    par = cfg.parallel
    validate_model_split(cfg, 1, par.pipe_parallel_size, par.virtual_pipe_stages)
    _validate_schedule(cfg)
    return validate_layout(cfg, world_size)


def validate_device(cfg: Config, device_type: str, triton_interpreter: bool = False) -> None:
    """What the run's device cannot run, refused before training starts (one line each, the first).
    Only what really fails: on CPU our own fp16 loss scaling, bf16, ``flex`` and the eager kernels all
    run; forced Triton kernels need CUDA or Triton's interpreter (``TRITON_INTERPRET=1``); flash_attn is
    CUDA only; fp16 under ZeRO needs DeepSpeed's fp16 on this machine (``zero_fp16_device_problem``).
    The attention impl's devices are its row in attention/impls.py (whether the triton package imports
    is ``attention.dispatch.check_impl_available``'s)."""
    problem = zero_fp16_device_problem(cfg) or device_problem(cfg.attention.impl, device_type, triton_interpreter)
    if problem:
        raise ConfigError(problem)
    if device_type == "cuda":
        return
    m = cfg.model
    if not triton_interpreter:
        for key in ("fused_rope", "fused_layernorm", "fused_cross_entropy"):
            if getattr(m, key) is True:
                raise ConfigError(f"{key}: true needs a CUDA device (this run is on {device_type}) or "
                                  "TRITON_INTERPRET=1 set before start; leave it unset (auto: eager on CPU) or false")


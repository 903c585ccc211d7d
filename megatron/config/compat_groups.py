"""NeoX / SepLLM rules that read several keys at once (the single-key rules are in neox_compat.py).

* precision: ``precision``, ``fp16: {enabled, type, ...}``, ``bf16: {enabled}`` as NeoX derives it;
* the SepLLM reference's attention rule (mode flags, windows per layer, initial tokens, separators);
* NeoX's ``attention_config`` (checked) and ``sliding_window_width``;
* ``bias_gelu_fusion`` (NeoX's fused GELU is the tanh approximation), Llemma's ``decay_lr_to``, and
  the reference's ``PRINT_KV_RATIO`` / ``print_ratio_intervals``.
"""
from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from typing import Any, Dict, List, Tuple

from megatron.config.compat_context import Context
from megatron.config.schema import FLAT_GROUPS, Config, OptimizerParams

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}
BF16_KEYS = {"enabled", "bf16", "loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis",
             "min_loss_scale", "immediate_grad_update"}
DENSE_TYPES = ("global", "flash")
REFUSED_TYPES = {**{t: "NeoX's sparse attention (DeepSpeed block-sparse kernels) is not implemented"
                    for t in ("local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer")},
                 "gmlp": "gMLP blocks are not implemented", "amlp": "aMLP blocks are not implemented",
                 "mamba": "Mamba blocks are not implemented", "rwkv": "RWKV blocks are not implemented"}
SEPLLM_RULE_KEYS = ("USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "USE_SEP_ATTN_KERNEL_ACCELERATOR",
                    "separator_token_ids", "init_tok_max_idx", "prefill_local_window_size",
                    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_loc_win_size_list")
REFERENCE_WINDOW, REFERENCE_PRINT_INTERVAL = 256, 8000


def _defaults() -> Dict[str, Any]:
    hints = typing.get_type_hints(Config)
    out = {}
    for group in FLAT_GROUPS:
        for f in dataclasses.fields(hints[group]):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
    out["optimizer.params.lr"] = OptimizerParams().lr
    return out


DEFAULTS = _defaults()


def ours(ctx: Context, key: str) -> Any:
    """Our key's value after the single-key rules (the schema default when nothing set it)."""
    return ctx.value(key, DEFAULTS.get(key))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def apply_groups(ctx: Context) -> None:
    precision(ctx)
    attention_config(ctx)
    sepllm(ctx)
    sliding_window(ctx)
    bias_gelu(ctx)
    decay_lr_to(ctx)
    kv_ratio(ctx)


# ---------------------------------------------------------------------------- precision
def _fp16_section(ctx: Context, chosen: List[Tuple[str, str]]) -> None:
    f16 = ctx.get("fp16")
    if not isinstance(f16, dict):
        ctx.assign("fp16", f16, "fp16")  # the schema check says it must be a mapping
        return
    section = {k: v for k, v in f16.items() if k not in ("fp16", "type", "auto_cast")}
    kind = f16.get("type")
    if kind not in (None, "fp16", "float16", "bfloat16"):
        ctx.problem("fp16.type", f"key 'fp16.type' = {kind!r} is not valid; expected fp16 or bfloat16")
    if section.get("enabled", False) is True:
        chosen.append(("bf16" if kind == "bfloat16" else "fp16", "fp16"))
    if kind == "bfloat16":  # DeeperSpeed's bf16 through the fp16 section: no loss scaling
        section = {"enabled": False}
    ctx.assign("fp16", section, "fp16")


def precision(ctx: Context) -> None:
    chosen: List[Tuple[str, str]] = []  # (precision, raw key saying so)
    if ctx.has("precision"):
        p = ctx.get("precision")
        if isinstance(p, str) and p in PRECISIONS:
            chosen.append((PRECISIONS[p], "precision"))
        else:
            ctx.assign("precision", p, "precision")  # the schema check names the valid values
    if ctx.has("fp16"):
        _fp16_section(ctx, chosen)
    if ctx.has("bf16"):
        b16 = ctx.get("bf16")
        if not isinstance(b16, dict):
            ctx.problem("bf16", f"key 'bf16' = {b16!r} is not valid; expected a mapping like {{enabled: true}}")
        else:
            for k in sorted(set(b16) - BF16_KEYS):
                ctx.problem(f"bf16.{k}", f"unknown key 'bf16.{k}'; expected {', '.join(sorted(BF16_KEYS))}")
            if b16.get("enabled", False) is True:
                chosen.append(("bf16", "bf16"))
    if not chosen:
        return
    last_file = max(ctx.order(k)[0] for _, k in chosen)
    final = [(v, k) for v, k in chosen if ctx.order(k)[0] == last_file]
    if len({v for v, _ in final}) > 1:
        says = ", ".join(f"'{k}' says {v}" for v, k in final)
        ctx.problem(final[-1][1], f"precision conflict: {says} (NeoX rejects this too)")
        return
    value, origin = max(final, key=lambda vk: ctx.order(vk[1]))
    earlier = [(v, k) for v, k in chosen if v != value]
    if earlier:
        v, k = earlier[-1]
        ctx.log(f"config: precision = {value!r} (from '{origin}', {ctx.where(origin)}) overrides {v!r} "
                f"(from '{k}', {ctx.where(k)})")
    ctx.assign("precision", value, origin, derived=True)
    section = ctx.value("fp16")
    if isinstance(section, dict):
        ctx.assign("fp16", {**section, "enabled": value == "fp16"}, ctx.out["fp16"].origin, derived=True)
    elif value == "fp16":
        ctx.assign("fp16", {"enabled": True}, origin, derived=True)


# ---------------------------------------------------------------------------- attention_config
def expand_attention_config(value: Any, num_layers: int) -> Tuple[List[str], str]:
    """NeoX's expansion of ``[[types, count], ...]`` (count may be "all"); returns (types, error)."""
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value), ""
    layers: List[str] = []
    for item in value if isinstance(value, list) else [None]:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                and all(isinstance(t, str) for t in item[0]) and (_int(item[1]) or item[1] == "all")):
            return [], f"expected a list like [[[\"flash\"], {num_layers}]], got {value!r}"
        types, count = list(item[0]), item[1]
        if count == "all":
            if not types or num_layers % len(types):
                return [], f"num_layers {num_layers} is not divisible by the pattern {types}"
            return types * (num_layers // len(types)), ""
        layers += types * count
    return layers, ""


def attention_config(ctx: Context) -> None:
    if not ctx.has("attention_config"):
        return
    num_layers = ours(ctx, "num_layers")
    layers, error = expand_attention_config(ctx.get("attention_config"), num_layers)
    if error:
        ctx.problem("attention_config", f"attention_config: {error}")
        return
    for t in sorted(set(layers)):
        if t in REFUSED_TYPES:
            ctx.problem("attention_config", f"attention_config type {t!r} is not supported: {REFUSED_TYPES[t]}")
        elif t not in DENSE_TYPES:
            ctx.problem("attention_config", f"attention_config type '{t}' is unknown; NeoX's types are "
                                            f"{', '.join(DENSE_TYPES + tuple(REFUSED_TYPES))}")
    if _int(num_layers) and len(layers) != num_layers:
        ctx.problem("attention_config", f"attention_config covers {len(layers)} layers but num_layers is "
                                        f"{num_layers} (NeoX requires them equal)")


# ---------------------------------------------------------------------------- SepLLM reference
def _latest(ctx: Context, keys) -> str:
    return max((k for k in keys if ctx.has(k)), key=ctx.order)


def _per_layer_windows(ctx: Context, origin: str) -> None:
    windows = ctx.get("prefill_loc_win_size_list")
    num_layers, seq = ours(ctx, "num_layers"), ours(ctx, "seq_length")
    if not (isinstance(windows, list) and windows and all(_int(w) and w >= 1 for w in windows)):
        ctx.problem("prefill_loc_win_size_list" if ctx.has("prefill_loc_win_size_list") else origin,
                    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS needs prefill_loc_win_size_list: a list of "
                    f"positive window sizes, one per layer (got {windows!r})")
        return
    if len(windows) != num_layers:
        ctx.problem("prefill_loc_win_size_list", f"prefill_loc_win_size_list has {len(windows)} windows but "
                                                 f"num_layers is {num_layers} (the reference requires them equal)")
        return
    full = [i for i, w in enumerate(windows) if _int(seq) and w >= seq]
    local = [w for i, w in enumerate(windows) if i not in full]
    key = "prefill_loc_win_size_list"
    ctx.assign("attention.sepllm.full_attention_layers", full, key)
    if local:
        common = Counter(local).most_common(1)[0][0]
        ctx.assign("attention.sepllm.n_local", common, key)
        ctx.assign("attention.sepllm.layer_n_local",
                   {i: w for i, w in enumerate(windows) if i not in full and w != common}, key)


def sepllm(ctx: Context) -> None:
    present = [k for k in SEPLLM_RULE_KEYS if ctx.has(k)]
    if not present:
        return
    origin = _latest(ctx, present)
    flags = {k: ctx.get(k, False) for k in ("USE_ORIGINAL_FULL_ATTEN", "streamingLLM",
                                            "USE_SEP_ATTN_KERNEL_ACCELERATOR")}
    for k, v in flags.items():
        if not isinstance(v, bool):
            ctx.problem(k, f"key '{k}' = {v!r} is not valid; expected bool")
            return
    if sum(flags.values()) > 1:
        on = [k for k, v in flags.items() if v]
        ctx.problem(_latest(ctx, on), f"{' and '.join(on)} are all true; the reference allows at most one")
        return
    mode = "full" if flags["USE_ORIGINAL_FULL_ATTEN"] else "streamingllm" if flags["streamingLLM"] else "sepllm"
    ctx.assign("attention.sepllm.mode", mode, origin)
    if mode != "full":
        ctx.log(f"config: attention mode '{mode}' from the SepLLM keys of {ctx.where(origin).rsplit(':', 1)[0]} "
                "(the reference trains SepLLM unless USE_ORIGINAL_FULL_ATTEN or streamingLLM is true)")
    if ctx.has("init_tok_max_idx"):
        v = ctx.get("init_tok_max_idx")
        if _int(v) and v >= -1:
            ctx.assign("attention.sepllm.n_init", v + 1, "init_tok_max_idx")
        else:
            ctx.problem("init_tok_max_idx", f"key 'init_tok_max_idx' = {v!r} is not valid; expected an "
                                            "integer >= -1 (the last initial position)")
    if ctx.has("separator_token_ids"):
        ids = ctx.get("separator_token_ids")
        if isinstance(ids, list) and all(_int(i) for i in ids):
            ctx.assign("attention.sepllm.separator_ids", [i for i in ids if i >= 0], "separator_token_ids")
        else:
            ctx.assign("attention.sepllm.separator_ids", ids, "separator_token_ids")  # the schema check
    per_layer = ctx.get("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", False) is True
    if per_layer:
        _per_layer_windows(ctx, "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS")
        if ctx.has("prefill_local_window_size"):
            ctx.noop("prefill_local_window_size")  # the reference ignores it when the list is on
    else:
        if ctx.has("prefill_loc_win_size_list"):
            ctx.noop("prefill_loc_win_size_list")  # ignored by the reference without the flag
        if ctx.has("prefill_local_window_size"):
            ctx.assign("attention.sepllm.n_local", ctx.get("prefill_local_window_size"), "prefill_local_window_size")
        elif mode != "full":
            ctx.assign("attention.sepllm.n_local", REFERENCE_WINDOW, origin)


# ---------------------------------------------------------------------------- other NeoX rules
def sliding_window(ctx: Context) -> None:
    if not ctx.has("sliding_window_width"):
        return
    width, seq = ctx.get("sliding_window_width"), ours(ctx, "seq_length")
    if width is None:
        ctx.noop("sliding_window_width")
        return
    if not (_int(width) and width >= 0):
        ctx.problem("sliding_window_width", f"key 'sliding_window_width' = {width!r} is not valid; "
                                            "expected an integer >= 0")
        return
    if any(ctx.has(k) for k in SEPLLM_RULE_KEYS):
        ctx.problem("sliding_window_width", "sliding_window_width and the SepLLM keys both set the attention "
                                            "rule; keep one")
        return
    if _int(seq) and width + 1 >= seq:
        ctx.log(f"config: sliding_window_width {width} covers seq_length {seq}: full causal attention")
        ctx.assign("attention.sepllm.mode", "full", "sliding_window_width")
        return
    for key, value in (("mode", "streamingllm"), ("n_init", 0), ("n_local", width + 1)):
        ctx.assign(f"attention.sepllm.{key}", value, "sliding_window_width")


def bias_gelu(ctx: Context) -> None:
    if not ctx.has("bias_gelu_fusion"):
        return
    if ctx.get("bias_gelu_fusion") is True and ours(ctx, "activation") == "gelu":
        ctx.assign("activation", "gelu_tanh", "bias_gelu_fusion", derived=True)
        ctx.log("config: activation gelu runs as gelu_tanh (bias_gelu_fusion: NeoX's fused bias-GELU is "
                "the tanh approximation)")
    else:
        ctx.noop("bias_gelu_fusion")


def decay_lr_to(ctx: Context) -> None:
    if not ctx.has("decay_lr_to"):
        return
    ratio = ctx.get("decay_lr_to")
    try:
        lr = float(ours(ctx, "optimizer.params.lr"))
    except (TypeError, ValueError):
        return  # the schema check reports the lr
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        ctx.problem("decay_lr_to", f"key 'decay_lr_to' = {ratio!r} is not valid; expected a fraction of lr "
                                   "in [0, 1]")
        return
    ctx.assign("min_lr", ratio * lr, "decay_lr_to")


def kv_ratio(ctx: Context) -> None:
    keys = [k for k in ("PRINT_KV_RATIO", "print_ratio_intervals") if ctx.has(k)]
    if not keys:
        return
    if ctx.get("PRINT_KV_RATIO") is not True:
        for k in keys:
            ctx.noop(k)
        return
    passes = ctx.get("print_ratio_intervals", REFERENCE_PRINT_INTERVAL)
    accum = ours(ctx, "gradient_accumulation_steps")
    if not (_int(passes) and passes >= 1):
        ctx.problem("print_ratio_intervals", f"key 'print_ratio_intervals' = {passes!r} is not valid; "
                                             "expected an integer >= 1")
        return
    ctx.assign("kv_ratio_interval", max(1, passes // accum if _int(accum) and accum > 0 else passes),
               _latest(ctx, keys))

"""Sep-Attention on a stock transformers model, through two hooks and a custom 4D mask.

transformers takes a prepared 4D attention mask as is (``masking_utils`` returns it unchanged) and
hands it to whatever attention kernel is configured (``sdpa`` or ``eager``). So Sep-Attention needs
no new attention function: a forward pre-hook on the base model works out, from the token ids, each
token's stream position, separator flag and document, evicts from the ``SepLLMCache`` when a bounded
budget is full, and passes the mask of the Sep-Attention rule; a pre-hook on every attention module
swaps in the mask of that layer's rule (hybrid full-attention layers, per-layer windows). The rule is
``sepllm_rule.visible``, the same function our training code uses.

``attach_sepllm`` is what the exported model classes call; ``enable_sepllm`` turns any loaded model
of a supported family into SepLLM without training (the paper's training-free setting).

This file is shipped inside exported model directories: it imports only torch and transformers.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from transformers.cache_utils import Cache

from .sepllm_budget import CacheBudget
from .sepllm_cache import SepLLMCache
from .sepllm_rule import SepRule, resolve_layer_rules, rule_problem, visible

DEFAULT_SEPARATORS = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
MASKABLE_ATTENTION = ("sdpa", "eager")

# model_type -> (base-model layer list attribute, attention attribute of a layer); the rotary module
# (when there is one) is the base model's ``rotary_emb``.
FAMILIES = {"gpt_neox": ("layers", "attention"), "llama": ("layers", "self_attn"),
            "gpt2": ("h", "attn"), "falcon": ("h", "self_attention")}


class SepLLMConfigError(ValueError):
    """A bad ``sepllm`` setting (config.json key or ``enable_sepllm`` argument)."""


@dataclass
class SepLLMSettings:
    """The ``sepllm`` entry of config.json: the training-time rule plus the default cache budget.

    The defaults (4 initial tokens, local window 256; cache a4 s64 w256 c800 in ``CacheBudget``) are the
    paper's training-free setting (SepLLM switched on in a pretrained Llama-3-8B), which ``enable_sepllm``
    serves. They differ on purpose from the trainer's ``SepLLMConfig`` (3 / 64: the reference training
    configs' ``init_tok_max_idx: 2`` and n64 window): an export writes the values it was trained with
    (``convert/hf_export.py: sepllm_settings``), so these defaults apply only to keys it leaves out."""

    mode: str = "sepllm"
    n_init: int = 4
    n_local: int = 256
    interval: int = 5
    separator_ids: List[int] = field(default_factory=list)
    full_attention_layers: List[int] = field(default_factory=list)
    layer_n_local: Dict[str, int] = field(default_factory=dict)
    separate_documents: bool = False
    eod_id: Optional[int] = None
    cache: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config.json 'sepllm'") -> "SepLLMSettings":
        if not isinstance(raw, dict):
            raise SepLLMConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
        known = {f: raw[f] for f in cls.__dataclass_fields__ if f in raw and raw[f] is not None}
        try:
            settings = cls(**known)
            settings.check(where)
        except (TypeError, ValueError) as err:
            raise SepLLMConfigError(f"{where}: {err}") from None
        return settings

    def check(self, where: str) -> None:
        for layer, window in [(None, self.n_local)] + list(self.layer_n_local.items()):
            problem = rule_problem(self.mode, self.n_init, int(window), self.interval)
            if problem:
                which = "" if layer is None else f" (layer_n_local[{layer}])"
                raise SepLLMConfigError(f"{where}: {problem}{which}")
        if self.separate_documents and self.eod_id is None:
            raise SepLLMConfigError(f"{where}: separate_documents needs eod_id (the end-of-document token)")
        self.budget()  # validates the cache entry

    def budget(self, **overrides) -> CacheBudget:
        policy = "streamingllm" if self.mode == "streamingllm" else "sepllm"
        return CacheBudget(**{"policy": policy, **self.cache, **overrides})

    def rules(self, num_layers: int) -> List[SepRule]:
        return resolve_layer_rules(num_layers, self.mode, self.n_init, self.n_local, self.interval,
                                   self.separate_documents, self.full_attention_layers, self.layer_n_local)


# ----------------------------------------------------------------------------- per-forward facts
def annotate_tokens(settings: SepLLMSettings, tokens: Optional[torch.Tensor], valid: torch.Tensor,
                    counters) -> tuple:
    """Stream facts of new tokens [B, L] continuing each row's stream: (entries dict, new counters).
    Padding (``valid`` False) does not advance a row's position."""
    seen, docs, doc_start = counters
    steps = valid.long()
    pos = seen[:, None] + torch.cumsum(steps, dim=1) - steps
    if tokens is None:
        tokens = torch.full_like(pos, -1)
    if settings.mode == "fixed_interval":
        is_sep = pos % settings.interval == settings.interval - 1
    else:
        ids = torch.tensor(settings.separator_ids, dtype=torch.long, device=tokens.device)
        is_sep = torch.isin(tokens, ids)
    if settings.eod_id is not None:
        is_eod = (tokens == settings.eod_id) & valid
        doc_ids = docs[:, None] + torch.cumsum(is_eod.long(), dim=1) - is_eod.long()
        after_eod = torch.cummax(torch.where(is_eod, pos + 1, torch.zeros_like(pos)), dim=1).values
        start = torch.maximum(torch.cat([torch.zeros_like(pos[:, :1]), after_eod[:, :-1]], dim=1),
                              doc_start[:, None])
        counters = (seen + steps.sum(1), docs + is_eod.long().sum(1), torch.maximum(after_eod[:, -1], doc_start))
    else:
        doc_ids, start = torch.zeros_like(pos), torch.zeros_like(pos)
        counters = (seen + steps.sum(1), docs, doc_start)
    entries = {"positions": pos, "token_ids": tokens, "is_sep": is_sep, "doc_ids": doc_ids,
               "pos_in_doc": pos - start, "valid": valid}
    return entries, counters


class ForwardPlan:
    """What one forward's attention masks are made from: the queries (new tokens) and the keys
    (cached entries followed by the new tokens), with stream facts for both."""

    def __init__(self, queries: dict, keys: dict, in_cache_causal: bool, float_dtype: Optional[torch.dtype]):
        self.q, self.k = queries, keys
        self.in_cache_causal = in_cache_causal  # decode_mask 'cache': plain causal inside the cache
        self.float_dtype = float_dtype  # None: boolean mask (sdpa); else additive mask of this dtype
        self._masks: Dict[SepRule, torch.Tensor] = {}

    def mask(self, rule: SepRule) -> torch.Tensor:
        if rule not in self._masks:
            self._masks[rule] = self._build(rule)
        return self._masks[rule]

    def _build(self, rule: SepRule) -> torch.Tensor:
        q_pos, k_pos = self.q["positions"][:, :, None], self.k["positions"][:, None, :]
        if self.in_cache_causal:
            keep = k_pos <= q_pos
        else:
            if rule.is_full:
                flags = torch.ones_like(self.k["is_sep"])
            elif rule.mode == "streamingllm":
                flags = torch.zeros_like(self.k["is_sep"])
            elif rule.mode == "fixed_interval":
                flags = self.k["positions"] % rule.interval == rule.interval - 1
            else:
                flags = self.k["is_sep"]
            same_doc = k_in_doc = None
            if rule.separate_documents:
                same_doc = self.q["doc_ids"][:, :, None] == self.k["doc_ids"][:, None, :]
                k_in_doc = self.k["pos_in_doc"][:, None, :]
            n_init, n_local = (0, 1) if rule.is_full else (rule.n_init, rule.n_local)
            keep = visible(q_pos, k_pos, flags[:, None, :], n_init, n_local, k_in_doc, same_doc)
        keep = keep & self.k["valid"][:, None, :]
        L, K = keep.shape[1], keep.shape[2]
        keep[:, torch.arange(L), torch.arange(K - L, K)] = True  # a padding query still sees itself
        keep = keep[:, None]
        if self.float_dtype is None:
            return keep
        return torch.zeros(keep.shape, dtype=self.float_dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(self.float_dtype).min)


# ----------------------------------------------------------------------------- the hooks
class SepLLMState:
    """Everything a SepLLM model keeps between hooks; lives on the model as ``sepllm_state``."""

    def __init__(self, model, settings: SepLLMSettings):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise SepLLMConfigError(f"SepLLM supports model types {sorted(FAMILIES)}, got {model_type!r}")
        if getattr(model.config, "alibi", False):
            raise SepLLMConfigError("SepLLM needs rotary or learned positions; this Falcon uses ALiBi")
        self.model, self.settings = model, settings
        self.base = model.base_model
        layer_list, attention_name = FAMILIES[model_type]
        self.attention_modules = [getattr(layer, attention_name) for layer in getattr(self.base, layer_list)]
        self.rules = settings.rules(len(self.attention_modules))
        self.signature = inspect.signature(self.base.forward)  # to read positional and keyword arguments alike
        parameters = self.signature.parameters
        self.var_kw = next((n for n, p in parameters.items() if p.kind is p.VAR_KEYWORD), None)
        self.cache_kw = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5
        # GPT-2's learned positions end at n_positions (transformers would index past its table)
        self.max_learned_position = getattr(model.config, "n_positions", None) if model_type == "gpt2" else None
        self.plan: Optional[ForwardPlan] = None
        self.handles: List[Any] = []

    # -- installation
    def install(self) -> None:
        self.handles.append(self.base.register_forward_pre_hook(self.before_forward, with_kwargs=True))
        for index, module in enumerate(self.attention_modules):
            hook = functools.partial(self.layer_mask, index)
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- caches
    def inv_freq(self) -> Optional[torch.Tensor]:
        rotary = getattr(self.base, "rotary_emb", None)
        return None if rotary is None else rotary.inv_freq

    def new_cache(self, **overrides) -> SepLLMCache:
        budget = self.settings.budget(**overrides)
        return SepLLMCache(len(self.attention_modules), **budget.__dict__)

    def _resolve_cache(self, cache, use_cache: bool) -> Optional[SepLLMCache]:
        if isinstance(cache, SepLLMCache):
            return cache
        if cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0):
            raise ValueError(f"a SepLLM model needs a SepLLMCache (it tracks which cached tokens are separators); "
                             f"got a filled {type(cache).__name__}. Use model.sepllm_cache()")
        # An empty stock cache (or none, with use_cache) becomes an unbounded one under the exact rule.
        return self.new_cache(policy="full", decode_mask="rule") if (cache is not None or use_cache) else None

    # -- hooks
    def _arguments(self, args, kwargs) -> Dict[str, Any]:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop(self.var_kw, {}) if self.var_kw else {}
        return {**bound, **extra}

    def before_forward(self, module, args, kwargs):
        """Base-model pre-hook: evict, note the new tokens' stream facts, pass the mask and positions.
        A forward without a cache but with use_cache gets an unbounded SepLLMCache under the exact rule
        (continuing from it needs to know which cached tokens are separators); training uses none."""
        call = self._arguments(args, kwargs)
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in MASKABLE_ATTENTION:
            raise ValueError(f"SepLLM runs on attn_implementation {MASKABLE_ATTENTION}, not {impl!r} (it needs a "
                             "custom attention mask); load with attn_implementation='sdpa'")
        tokens, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if tokens is None and self.settings.mode == "sepllm":
            raise ValueError("SepLLM attention finds separators in input_ids; pass input_ids, not inputs_embeds")
        shape = tokens.shape if tokens is not None else embeds.shape[:2]
        device = tokens.device if tokens is not None else embeds.device
        cache = call.pop("past_key_values", None) if self.cache_kw != "past_key_values" else None
        cache = call.get(self.cache_kw) if call.get(self.cache_kw) is not None else cache
        use_cache = call.get("use_cache")
        use_cache = getattr(self.model.config, "use_cache", False) if use_cache is None else use_cache
        use_cache = use_cache and not (self.model.training and torch.is_grad_enabled())
        cache = self._resolve_cache(cache, use_cache)
        valid = self._valid(call.get("attention_mask"), shape, device, cache)
        float_dtype = None if impl == "sdpa" and not call.get("output_attentions") else self.model.dtype
        positions = self._plan(tokens, valid, cache, float_dtype)
        if call.get("position_ids") is None or positions is not None:
            call["position_ids"] = positions if positions is not None else self.plan.q["positions"]
        if self.max_learned_position is not None and int(call["position_ids"].max()) >= self.max_learned_position:
            raise ValueError(f"position {int(call['position_ids'].max())} is beyond the {self.max_learned_position} "
                             "learned positions of this model; generate with a bounded SepLLM cache (positional shift "
                             "keeps positions below cache_size)")
        call[self.cache_kw] = cache
        call["attention_mask"] = self.plan.mask(self.rules[0])
        return (), call

    def _valid(self, attention_mask, shape, device, cache) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2:
            raise ValueError("SepLLM builds its own 4D attention mask; pass a 2D padding mask (or none)")
        valid = attention_mask[:, -shape[1]:].to(device=device, dtype=torch.bool)
        if cache is not None and cache.budget.bounded and not bool(attention_mask.all()):
            raise ValueError("a bounded SepLLM cache cannot hold padding; generate unpadded prompts one at a time")
        return valid

    def _plan(self, tokens, valid, cache: Optional[SepLLMCache], float_dtype) -> Optional[torch.Tensor]:
        """Build ``self.plan``; return position ids to force (places under positional shift) or None."""
        B, L = valid.shape
        if cache is None:
            zeros = torch.zeros(B, dtype=torch.long, device=valid.device)
            entries, _ = annotate_tokens(self.settings, tokens, valid, (zeros, zeros, zeros))
            self.plan = ForwardPlan(entries, entries, False, float_dtype)
            return None
        ledger = cache.start_ledger(B, valid.device)
        cache.make_room(L, self.inv_freq())
        places = torch.arange(ledger.length, ledger.length + L, device=valid.device)
        entries, counters = annotate_tokens(self.settings, tokens, valid,
                                            (ledger.seen, ledger.docs, ledger.doc_start))
        ledger.append(entries, counters)
        cache.committed()
        keys = {name: getattr(ledger, name) for name in ledger.FIELDS}
        self.plan = ForwardPlan(entries, keys, cache.budget.decode_mask == "cache", float_dtype)
        if cache.budget.bounded and cache.budget.enable_pos_shift:
            return places[None].expand(B, L)
        return None

    def layer_mask(self, index: int, module, args, kwargs):
        """Attention pre-hook: the mask of this layer's rule (hybrid layers and windows differ)."""
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"SepLLM: layer {index}'s attention was called without an attention_mask keyword")
        if self.plan is None:
            raise RuntimeError("SepLLM: attention ran before the model's SepLLM hook (call the model, not a layer)")
        kwargs["attention_mask"] = self.plan.mask(self.rules[index])
        return args, kwargs


# ----------------------------------------------------------------------------- public entry points
def attach_sepllm(model, settings: SepLLMSettings) -> SepLLMState:
    """Install Sep-Attention on ``model`` (idempotent: a previous installation is replaced)."""
    previous = getattr(model, "sepllm_state", None)
    if previous is not None:
        previous.remove()
    state = SepLLMState(model, settings)
    state.install()
    model.sepllm_state = state
    return state


def sepllm_generate(model, generate, *args, **kwargs):
    """``generate`` with the config's bounded SepLLM cache unless a cache is given or use_cache=False.
    Prompts longer than what one forward may append are prefilled in chunks, as tools/generate.py does."""
    cache = kwargs.pop("cache", None)
    cache = kwargs.pop("past_key_values", None) if cache is None else cache
    use_cache = kwargs.get("use_cache", getattr(model.generation_config, "use_cache", True))
    if cache is None and use_cache is not False:
        cache = model.sepllm_state.new_cache()
    if isinstance(cache, SepLLMCache) and cache.budget.max_new_per_forward is not None:
        limit = cache.budget.max_new_per_forward
        asked = kwargs.get("prefill_chunk_size") or getattr(model.generation_config, "prefill_chunk_size", None)
        kwargs["prefill_chunk_size"] = min(asked or limit, limit)
    if cache is not None:
        kwargs["cache"] = cache
    return generate(*args, **kwargs)


def separator_ids_from_tokenizer(tokenizer, separators: Sequence[str] = DEFAULT_SEPARATORS,
                                 include_space_prefixed: bool = True) -> List[int]:
    """Ids of the vocabulary tokens whose text is exactly a separator (or ' ' + one)."""
    wanted = set(separators) | ({" " + s for s in separators} if include_space_prefixed else set())
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    found = set()
    for token, index in tokenizer.get_vocab().items():
        if index not in special and tokenizer.convert_tokens_to_string([token]) in wanted:
            found.add(int(index))
    return sorted(found)


def enable_sepllm(model, n_init: int = 4, n_local: int = 256, separator_ids: Optional[Sequence[int]] = None,
                  tokenizer=None, separators: Sequence[str] = DEFAULT_SEPARATORS, mode: str = "sepllm",
                  interval: int = 5, full_attention_layers: Sequence[int] = (),
                  layer_n_local: Optional[Dict[int, int]] = None, separate_documents: bool = False,
                  eod_id: Optional[int] = None, cache: Optional[Dict[str, Any]] = None):
    """Turn a loaded transformers model (GPT-NeoX, Llama, GPT-2, Falcon) into Sep-Attention with the
    bounded Streaming-SepLLM cache for ``generate``. Separators: explicit ``separator_ids``, else the
    tokens of ``tokenizer`` whose text is one of ``separators``. The settings are stored in
    ``model.config.sepllm`` (so ``save_pretrained`` keeps them). Returns the model.
    ``n_init=4, n_local=256`` are the paper's training-free setting, not the trainer's 3 / 64 (see
    ``SepLLMSettings``)."""
    if separator_ids is None:
        if tokenizer is None and mode == "sepllm":
            raise SepLLMConfigError("enable_sepllm needs separator_ids=[...] or tokenizer=... to find separators")
        separator_ids = separator_ids_from_tokenizer(tokenizer, separators) if tokenizer is not None else []
    if separate_documents and eod_id is None and tokenizer is not None:
        eod_id = tokenizer.eos_token_id
    raw = {"mode": mode, "n_init": n_init, "n_local": n_local, "interval": interval,
           "separator_ids": sorted(set(int(i) for i in separator_ids)),
           "full_attention_layers": list(full_attention_layers),
           "layer_n_local": {str(k): int(v) for k, v in (layer_n_local or {}).items()},
           "separate_documents": separate_documents, "eod_id": eod_id, "cache": dict(cache or {})}
    settings = SepLLMSettings.from_dict(raw, where="enable_sepllm")
    model.config.sepllm = raw
    attach_sepllm(model, settings)
    if not isinstance(model, SepLLMMixin):
        original = model.generate
        model.generate = functools.partial(sepllm_generate, model, original)
        model.sepllm_cache = model.sepllm_state.new_cache
    return model


class SepLLMMixin:
    """Mixed into the stock ``*ForCausalLM`` classes by the exported ``modeling_sepllm.py``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        attach_sepllm(self, SepLLMSettings.from_dict(getattr(config, "sepllm", None)))

    def sepllm_cache(self, **overrides) -> SepLLMCache:
        """A fresh Streaming-SepLLM cache: the budget of config.json 'sepllm.cache', with ``overrides``
        (policy, init_cache_size, sep_cache_size, local_size, cache_size, enable_pos_shift, decode_mask)."""
        return self.sepllm_state.new_cache(**overrides)

    def generate(self, *args, **kwargs):
        return sepllm_generate(self, super().generate, *args, **kwargs)

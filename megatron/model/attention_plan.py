"""Which attention a model runs: the rule of every layer and the separator ids, resolved in one place.

Every entry path resolves the plan once, from (model config, SepLLM config, tokenizer), and hands it
on: the trainer to the model, the start-up summary and the FLOPs counter; streaming inference and
evaluation to the model they load; the HF export to the exported settings; ``deepy.py --dry-run`` to
the summary it prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron.attention.sepllm_rule import SepRule, resolve_layer_rules
from megatron.config.schema import ModelConfig, SepLLMConfig


@dataclass(frozen=True)
class AttentionPlan:
    rules: Tuple[SepRule, ...]  # one per layer
    base_rule: SepRule  # the configured mode (separator flags are computed by it)
    separator_ids: Optional[Tuple[int, ...]]  # sorted, unique; None: unknown (no tokenizer, none set by number)

    @property
    def uses_separators(self) -> bool:
        """Some layer's rule keeps separators."""
        return any(r.mode == "sepllm" for r in self.rules)

    @property
    def separator_list(self) -> List[int]:
        return list(self.separator_ids or ())


def layer_rules(model: ModelConfig, sep: SepLLMConfig) -> List[SepRule]:
    """The rule of every layer (hybrid full-attention layers and per-layer windows applied)."""
    return resolve_layer_rules(model.num_layers, sep.mode, sep.n_init, sep.n_local, sep.interval,
                               sep.separate_documents, sep.full_attention_layers, sep.layer_n_local)


def resolve_attention_plan(model: ModelConfig, sep: SepLLMConfig, tokenizer=None,
                           separator_ids: Optional[Sequence[int]] = None) -> AttentionPlan:
    """The plan of a model: ids set by number in the config win, then ``separator_ids`` (given by the
    caller, e.g. a command-line override), then the tokenizer's ids of ``separator_tokens``."""
    ids: Optional[Sequence[int]] = None
    if sep.separator_ids is None and separator_ids is not None:
        ids = separator_ids
    elif sep.separator_ids is not None or tokenizer is not None:
        ids = sep.separator_ids_from(tokenizer)
    base = SepRule(sep.mode, sep.n_init, sep.n_local, sep.interval, sep.separate_documents)
    return AttentionPlan(tuple(layer_rules(model, sep)), base,
                         None if ids is None else tuple(sorted(set(int(i) for i in ids))))

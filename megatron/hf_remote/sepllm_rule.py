"""In-repo stand-in for the exported ``sepllm_rule.py``: the rule is defined once, in
``megatron/attention/sepllm_rule.py``, and the HF export copies that file here verbatim, so the
exported modeling code (``from .sepllm_rule import ...``) runs without this package."""
from megatron.attention.sepllm_rule import *  # noqa: F401,F403
from megatron.attention.sepllm_rule import MODES, SepRule, resolve_layer_rules, rule_problem, visible  # noqa: F401

"""What an HF export of a Sep-Attention model carries so that stock transformers computes it.

config.json gets ``auto_map`` naming ``modeling_sepllm.SepLLM<Architecture>`` (the stock class with
Sep-Attention installed, see ``megatron/hf_remote``) and, under ``sepllm``, the rule's settings plus
the default Streaming-SepLLM cache budget that ``generate`` uses. The modeling files are copied into
the export; the rule file is ``megatron/attention/sepllm_rule.py`` itself, so there is one definition.
Loaded without ``trust_remote_code`` the same directory is the plain architecture (full attention).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron.config.schema import Config
from megatron.convert.common import ConversionError
from megatron.hf_remote import EXPORT_FILES
from megatron.hf_remote.sepllm_budget import CacheBudget

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the megatron package


def needs_remote_code(cfg: Config) -> bool:
    """Every rule but plain causal attention differs from what the stock classes compute."""
    return cfg.attention.sepllm.mode != "full"


def auto_map(architecture: str) -> Dict[str, str]:
    return {"AutoModelForCausalLM": f"modeling_sepllm.SepLLM{architecture}"}


def cache_settings(cfg: Config, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The default cache budget of ``generate``: tools/generate.py's defaults, the StreamingLLM policy
    for a StreamingLLM-trained model, then ``overrides``; checked like the CLI checks it."""
    policy = "streamingllm" if cfg.attention.sepllm.mode == "streamingllm" else "sepllm"
    settings = {**dataclasses.asdict(CacheBudget(policy=policy)), **(overrides or {})}
    try:
        budget = CacheBudget(**settings)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"cache settings: {err}") from None
    m = cfg.model
    max_pos = m.max_position_embeddings or m.seq_length
    if m.pos_emb == "learned" and budget.policy != "full" and budget.enable_pos_shift and budget.cache_size > max_pos:
        raise ConversionError(f"cache_size {budget.cache_size} exceeds the model's {max_pos} learned positions; "
                              "pass a smaller --cache-size (positional shift keeps positions below it)")
    return dataclasses.asdict(budget)


def write_remote_code(out: Path) -> List[str]:
    """Copy the modeling files next to the weights; returns their names."""
    for name, source in EXPORT_FILES.items():
        shutil.copyfile(PACKAGE_ROOT / source, out / name)
    return list(EXPORT_FILES)

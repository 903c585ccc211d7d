"""What a run will do, in words: printed at start-up by the trainer and by ``deepy.py --dry-run``.

* the attention rule of every layer (full / SepLLM n_init + separators + n_local / streaming / fixed
  interval) and the position encoding;
* the separator ids with their tokens;
* parameter counts (built on the ``meta`` device, so a 20B config costs nothing);
* the batch and token arithmetic;
* the data and tokenizer paths that must exist (every missing one at once).
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.attention import SepRule
from megatron.config import Config
from megatron.errors import DataError
from megatron.model.attention_plan import AttentionPlan, layer_rules, resolve_attention_plan


def describe_rule(rule: SepRule) -> str:
    docs = ", within documents" if rule.separate_documents else ""
    if rule.mode == "full":
        return "full causal attention" + (" within documents" if rule.separate_documents else "")
    if rule.mode == "sepllm":
        return f"SepLLM: {rule.n_init} initial + separators + local window {rule.n_local}{docs}"
    if rule.mode == "streamingllm":
        return f"streaming: {rule.n_init} initial + local window {rule.n_local}{docs}"
    return (f"fixed interval: {rule.n_init} initial + every {rule.interval}th position + local window "
            f"{rule.n_local}{docs}")


def _ranges(layers: Sequence[int]) -> str:
    spans: List[Tuple[int, int]] = []
    for i in layers:
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def position_encoding(cfg: Config) -> str:
    m = cfg.model
    if m.pos_emb == "rotary":
        dims = int(m.head_dim * m.rotary_pct)
        text = f"rotary on {dims} of {m.head_dim} head dims (base {m.rotary_emb_base:g})"
    elif m.pos_emb == "learned":
        text = f"learned absolute embeddings ({m.max_position_embeddings or m.seq_length} positions)"
    elif m.pos_emb == "alibi":
        text = "ALiBi"
    else:
        text = "none"
    if m.bipe:
        text += ", BiPE (bilevel: positions within segments, segments between separators)"
    return text


def attention_lines(cfg: Config, rules: Sequence[SepRule]) -> List[str]:
    """One line per group of layers with the same rule, then the position encoding."""
    by_text: Dict[str, List[int]] = {}
    for i, rule in enumerate(rules):
        by_text.setdefault(describe_rule(rule), []).append(i)
    lines = [f"attention, layer{'s' if len(ids) > 1 else ''} {_ranges(ids)}: {text}"
             for text, ids in sorted(by_text.items(), key=lambda kv: kv[1][0])]
    return lines + [f"position encoding: {position_encoding(cfg)}"]


def uses_separators(cfg: Config, plan: AttentionPlan) -> bool:
    return plan.uses_separators or cfg.model.bipe


def separator_line(ids: Sequence[int], token_texts: Optional[Dict[int, str]] = None,
                   what: str = "separators") -> str:
    texts, ids = token_texts or {}, sorted(set(ids))
    shown = ", ".join(f"{i} {texts[i]!r}" if i in texts else str(i) for i in ids)
    return f"{what} ({len(ids)} ids): {shown or 'none'}"


def looks_like_separator(text: Optional[str]) -> bool:
    """Punctuation, symbols and whitespace only: what SepLLM's separators are."""
    return bool(text) and all(ch.isspace() or unicodedata.category(ch)[0] in "PS" for ch in text)


def separator_lines(cfg: Config, separator_ids: Sequence[int], token_texts: Dict[int, str],
                    rules: Optional[Sequence[SepRule]] = None) -> List[str]:
    """The separator ids with their tokens (SepLLM layers, BiPE), and a warning for ids set by number in
    the config that are not punctuation or whitespace in this tokenizer: ids are tokenizer-specific, and
    the SepLLM reference's configs list GPT-NeoX-20B's. ``rules``: the plan's (default: the config's)."""
    sep, lines = cfg.attention.sepllm, []
    listed: List[Tuple[str, Sequence[int], bool]] = []
    rules = layer_rules(cfg.model, sep) if rules is None else rules
    if any(r.mode == "sepllm" for r in rules):
        listed.append(("separators", separator_ids, sep.separator_ids is not None))
    if cfg.model.bipe:
        bipe = cfg.model.bipe_separator_ids
        listed.append(("BiPE separators", separator_ids if bipe is None else bipe,
                       bipe is not None or sep.separator_ids is not None))
    warned: List[List[int]] = []
    for what, ids, by_number in listed:
        lines.append(separator_line(ids, token_texts, what))
        odd = sorted(i for i in set(ids) if not looks_like_separator(token_texts.get(i)))
        if by_number and odd and odd not in warned:
            warned.append(odd)
            where = f" ({cfg.data.vocab_file})" if cfg.data.vocab_file else ""
            lines.append(f"warning: {what} {', '.join(map(str, odd))} are not punctuation or whitespace in "
                         f"this tokenizer{where}; separator ids depend on the tokenizer (the "
                         "SepLLM reference's are GPT-NeoX-20B's): set attention.sepllm.separator_tokens to "
                         "choose them by text")
    return lines


def parameter_counts(cfg: Config, vocab_size: int, plan: Optional[AttentionPlan] = None) -> Dict[str, int]:
    """Counts of the whole (one-rank) model, built on the meta device: total, embedding (input token
    and position tables) and the matmul parameters per token (non-embedding + the LM head's)."""
    from megatron.model import build_model

    model = build_model(cfg, vocab_size, plan or (), device="meta")
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if n in ("embed.weight", "pos_embed"))
    head = 0 if cfg.model.no_weight_tying else vocab_size * cfg.model.hidden_size  # tied: the head reuses embed
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "matmul": total - embedding + head}


def parameter_line(cfg: Config, counts: Dict[str, int], vocab_size: int, tokenizer_vocab: int) -> str:
    return (f"parameters: {counts['total']:,} ({counts['non_embedding']:,} non-embedding); vocabulary "
            f"{vocab_size:,} ({tokenizer_vocab:,} padded to a multiple of {cfg.model.make_vocab_size_divisible_by}"
            f" x model_parallel_size {cfg.parallel.model_parallel_size})")


def batch_line(cfg: Config, dp: int) -> str:
    tr, seq = cfg.training, cfg.model.seq_length
    batch = tr.train_micro_batch_size_per_gpu * tr.gradient_accumulation_steps * dp
    per_iter = batch * seq
    return (f"batch: micro {tr.train_micro_batch_size_per_gpu} x accumulation {tr.gradient_accumulation_steps} "
            f"x data-parallel {dp} = {batch} sequences x {seq} tokens = {per_iter:,} tokens per iteration; "
            f"{tr.train_iters:,} iterations = {per_iter * tr.train_iters:,} tokens")


def missing_paths(cfg: Config) -> List[str]:
    """Every data prefix (.bin/.idx) and tokenizer file the config names that does not exist."""
    d = cfg.data
    out = []
    prefixes = [("data_path", d.data_path)] if d.data_path else []
    for key in ("train_data_paths", "valid_data_paths", "test_data_paths"):
        prefixes += [(key, p) for p in getattr(d, key) or []]
    for key, prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                out.append(f"{key} '{prefix}': file '{prefix}{ext}' not found")
    if not prefixes:
        out.append("no training data: set 'data_path' or 'train_data_paths'")
    files = [("vocab_file", d.vocab_file)] + ([("merge_file", d.merge_file)] if d.merge_file else [])
    for key, path in files:
        if not path:
            out.append(f"{key} is not set; the tokenizer needs it")
        elif not Path(path).is_file():
            out.append(f"{key} '{path}' not found")
    return out


def check_paths(cfg: Config) -> None:
    missing = missing_paths(cfg)
    if len(missing) == 1:
        raise DataError(missing[0])
    if missing:
        raise DataError(f"{len(missing)} missing paths:\n  " + "\n  ".join(missing))


def run_report(cfg: Config, dp: int) -> List[str]:
    """Everything above for ``deepy.py --dry-run`` (checks the paths first; loads the tokenizer)."""
    from megatron.tokenizer import build_tokenizer, padded_vocab_size

    check_paths(cfg)
    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                              cfg.parallel.model_parallel_size)
    plan = resolve_attention_plan(cfg.model, cfg.attention.sepllm, tokenizer)
    return summary_lines(cfg, parameter_counts(cfg, vocab, plan), vocab, tokenizer, plan, dp)


def summary_lines(cfg: Config, counts: Dict[str, int], vocab_size: int, tokenizer, plan: AttentionPlan,
                  dp: int) -> List[str]:
    """The run in words, as the trainer logs it at start-up and ``--dry-run`` prints it."""
    lines = [parameter_line(cfg, counts, vocab_size, tokenizer.vocab_size)] + attention_lines(cfg, plan.rules)
    if uses_separators(cfg, plan):
        lines += separator_lines(cfg, plan.separator_list, tokenizer.token_texts(), plan.rules)
    return lines + [batch_line(cfg, dp)]

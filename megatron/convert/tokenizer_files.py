"""Tokenizer files next to a checkpoint: copying, the YAML keys that point at them, sizes and ids."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron.config.schema import Config, DataConfig
from megatron.convert.common import read_json
from megatron.errors import DataError
from megatron.model.attention_plan import resolve_attention_plan
from megatron.tokenizer import Tokenizer, build_tokenizer

# Tokenizer files copied between an HF directory and our tokenizer directory, when present
# (transformers 5 keeps a chat model's template in chat_template.jinja, older versions in
# tokenizer_config.json or chat_template.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            dst_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def special_token_ids(tokenizer_dir: Path) -> Dict[str, int]:
    """bos/eos ids (and pad, where the tokenizer names one) from tokenizer_config.json + tokenizer.json
    (or vocab.json); {} when unknown."""
    vocab: Dict[str, int] = {}
    if (tokenizer_dir / "tokenizer.json").is_file():
        tok = read_json(tokenizer_dir / "tokenizer.json")
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE / WordPiece: token -> id
            vocab.update(model_vocab)
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...] in id order
            vocab.update({piece[0]: i for i, piece in enumerate(model_vocab)})
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens") or []})
    elif (tokenizer_dir / "vocab.json").is_file():
        vocab.update(read_json(tokenizer_dir / "vocab.json"))
    names: Dict[str, Any] = {}
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tc = read_json(tokenizer_dir / "tokenizer_config.json")
        names = {k: tc.get(k) for k in ("bos_token", "eos_token", "pad_token")}
    fallbacks = {"bos_token": ["<|begin_of_text|>", "<s>", "<|endoftext|>"],
                 "eos_token": ["<|end_of_text|>", "</s>", "<|endoftext|>"], "pad_token": []}
    ids: Dict[str, int] = {}
    for key, candidates in fallbacks.items():
        name = names.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        for cand in ([name] if name else []) + candidates:
            if cand in vocab:
                ids[key + "_id"] = int(vocab[cand])
                break
    return ids


def tokenizer_data_keys(files_dir: Path, target_dir: Path) -> Dict[str, str]:
    """The data keys of our YAML for the tokenizer files in ``files_dir``, once copied to ``target_dir``."""
    def has(*names: str) -> bool:
        return all((files_dir / n).is_file() for n in names)

    if has("tokenizer.json"):
        return {"tokenizer_type": "HFTokenizer", "vocab_file": str(target_dir / "tokenizer.json")}
    if has("vocab.json", "merges.txt"):
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(target_dir / "vocab.json"),
                "merge_file": str(target_dir / "merges.txt")}
    if has("tokenizer.model"):
        return {"tokenizer_type": "SPMTokenizer", "vocab_file": str(target_dir / "tokenizer.model")}
    return {}


def project_tokenizer(data: DataConfig) -> Optional[Tokenizer]:
    """Our tokenizer for the config's files, or None where they are absent or unreadable."""
    if not data.vocab_file or not Path(data.vocab_file).is_file():
        return None
    try:
        return build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file)
    except DataError:
        return None


def tokenizer_vocab_size(data: DataConfig) -> Optional[int]:
    """The unpadded vocabulary size the trainer pads, from the tokenizer files of the config."""
    tok = project_tokenizer(data)
    return None if tok is None else int(tok.vocab_size)


def resolved_separator_ids(cfg: Config) -> Optional[List[int]]:
    """Separator ids as training used them: explicit ids, else derived from the tokenizer."""
    tok = None if cfg.attention.sepllm.separator_ids is not None else project_tokenizer(cfg.data)
    ids = resolve_attention_plan(cfg.model, cfg.attention.sepllm, tok).separator_ids
    return None if ids is None else list(ids)

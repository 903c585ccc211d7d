"""What an HF tokenizer directory says besides the vocabulary: the model's own end-of-sequence token
and its chat template.

Read from the files transformers writes next to tokenizer.json (an imported checkpoint keeps them in
its tokenizer/ folder): tokenizer_config.json ('eos_token', the special tokens, and in transformers 4
'chat_template'), chat_template.jinja (transformers 5) or chat_template.json. A chat model's eos is
usually an end-of-turn token (SmolLM2 / ChatML: '<|im_end|>') that differs from the end-of-document
token pretraining data is split with, so generation stops at both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron.errors import DataError
from megatron.tokenizer.tokenizer import Tokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_files_dir(tokenizer: Tokenizer) -> Optional[Path]:
    source = getattr(tokenizer, "source", None)
    return Path(source).parent if source else None


def read_tokenizer_config(tokenizer: Tokenizer) -> Dict[str, Any]:
    """tokenizer_config.json next to the tokenizer file; {} when there is none."""
    folder = tokenizer_files_dir(tokenizer)
    path = folder / "tokenizer_config.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"'{path}' is not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(config, dict):
        raise DataError(f"'{path}' must hold a JSON object")
    return config


def special_tokens(config: Dict[str, Any]) -> Dict[str, str]:
    """The special tokens' texts by name (bos_token, eos_token, ...) as the tokenizer config gives them."""
    found = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[key] = value
    return found


def stop_ids(tokenizer: Tokenizer) -> List[int]:
    """Where generation ends: the end-of-document id and the model's own eos token."""
    ids = {int(tokenizer.eod_id)}
    eos = special_tokens(read_tokenizer_config(tokenizer)).get("eos_token")
    eos_id = tokenizer.token_id(eos) if eos else None
    if eos_id is not None:
        ids.add(int(eos_id))
    return sorted(ids)


def chat_template(tokenizer: Tokenizer) -> Optional[str]:
    """The chat template of the tokenizer's directory, or None when the model has none."""
    folder = tokenizer_files_dir(tokenizer)
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template: Any = None
    if (folder / "chat_template.json").is_file():
        try:
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"'{folder / 'chat_template.json'}' is not a JSON object with 'chat_template'") from None
    if template is None:
        template = read_tokenizer_config(tokenizer).get("chat_template")
    if isinstance(template, list):  # transformers 4: named templates; 'default' is the one apply_chat_template uses
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def render_chat(tokenizer: Tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` under the model's chat template, rendered the way transformers'
    ``apply_chat_template`` does (sandboxed Jinja, trim_blocks / lstrip_blocks, the special tokens)."""
    template = chat_template(tokenizer)
    if template is None:
        raise DataError(f"the tokenizer in '{tokenizer_files_dir(tokenizer)}' has no chat template "
                        "(chat_template.jinja, chat_template.json or tokenizer_config.json 'chat_template')")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **special_tokens(read_tokenizer_config(tokenizer)))
    except jinja2.exceptions.TemplateError as err:
        raise DataError(f"the chat template of '{tokenizer_files_dir(tokenizer)}' failed: {err}") from None

"""docs/config.md is generated from the schema (megatron/config/docs.py), and every field is described."""
import dataclasses
import re
import textwrap
import typing
from pathlib import Path

from megatron.config import Config
from megatron.config.docs import REGENERATE, SCHEMA_PATH, markdown, missing_descriptions
from megatron.config.schema import NESTED_GROUPS

ROOT = Path(__file__).resolve().parents[1]


def test_every_schema_field_has_a_one_line_description():
    missing = missing_descriptions(SCHEMA_PATH.read_text())
    assert missing == [], (
        f"fields without a description in megatron/config/schema.py: {', '.join(missing)}. Put a one-line "
        "string literal on the line after each field, e.g.\n    num_layers: int = 2\n    \"\"\"Transformer "
        f"blocks.\"\"\"\nthen run `{REGENERATE}` (or `make docs`)")


def test_a_field_without_a_description_is_found():
    source = textwrap.dedent('''
        @dataclass
        class Demo:
            described: int = 1
            """What it does."""
            bare: int = 2  # a comment is not a description
            two_lines: int = 3
            """First line.
            Second line."""
    ''')
    assert missing_descriptions(source) == ["Demo.bare (line 6)", "Demo.two_lines (line 7)"]


def test_config_md_is_generated_from_the_schema():
    assert (ROOT / "docs" / "config.md").read_text() == markdown(), f"docs/config.md is stale; run `{REGENERATE}`"
    assert "docs/config.md" in (ROOT / "README.md").read_text()


def _yaml_keys(cls, prefix=""):
    """Every key of the runtime schema as YAML writes it, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _yaml_keys(hints[f.name], f"{prefix}{f.name}.")


def test_config_md_has_one_row_per_key_of_the_runtime_schema():
    expected = []
    for group in dataclasses.fields(Config):
        prefix = f"{group.name}." if group.name in NESTED_GROUPS else ""
        expected += list(_yaml_keys(typing.get_type_hints(Config)[group.name], prefix))
    rows = re.findall(r"^\| `([^`]+)` \|", markdown(), flags=re.M)
    assert sorted(rows) == sorted(expected) and len(rows) == len(set(rows))


def test_rows_give_type_default_and_the_translated_spellings():
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `([^`]+)` \| (.*?) \| (.*?) \| (.*?) \| (.*?) \|$", markdown(),
                                              flags=re.M)}
    assert rows["num_kv_heads"][:2] == ("int or null", "`null`")
    assert rows["attention.sepllm.separator_tokens"][1] == '`[".", ",", "?", "!", ";", ":", " ", "\\t", "\\n"]`'
    assert rows["init_method"][0].startswith('one of "normal", "scaled_normal", ')  # through the type alias
    assert rows["bipe"][3] == "`USE_BiPE` (SepLLM)"
    assert rows["attention.sepllm.n_local"][3] == "`prefill_local_window_size` (SepLLM), " \
                                                  "`prefill_loc_win_size_list` (SepLLM)"
    assert rows["precision"][3] == "`fp16` (NeoX (DeepSpeed)), `bf16` (NeoX (DeepSpeed))"
    assert rows["fp16"][3] == ""  # the same spelling is no translation

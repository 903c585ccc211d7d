"""docs/config.md, generated from the schema: every key with its type, default and description.

A field's description is the string literal on the line after it in ``schema.py`` (read with ``ast``,
as Python keeps no field docstrings at run time). The last column lists the GPT-NeoX / SepLLM spellings
that ``neox_compat.py`` translates into the key (same-name keys are in docs/neox_compat.md).

    python -m megatron.config.docs > docs/config.md      (or: make docs)

``tests/test_config_docs.py`` fails when a field has no description or the file differs.
"""
from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron.config import schema
from megatron.config.neox_compat import MAPPED, RULES

SCHEMA_PATH = Path(schema.__file__)
REGENERATE = "python -m megatron.config.docs > docs/config.md"


@dataclass(frozen=True)
class FieldDoc:
    name: str
    annotation: ast.expr
    default: Optional[ast.expr]
    description: Optional[str]
    line: int


def schema_classes(source: str) -> Dict[str, List[FieldDoc]]:
    """Every class of the schema source with its fields in order (description None where missing)."""
    classes: Dict[str, List[FieldDoc]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = classes.setdefault(node.name, [])
        for stmt, after in zip(node.body, node.body[1:] + [None]):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc = None
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                doc = after.value.value
            fields.append(FieldDoc(stmt.target.id, stmt.annotation, stmt.value, doc, stmt.lineno))
    return classes


def missing_descriptions(source: str) -> List[str]:
    """``Class.field (line N)`` for every dataclass field without a one-line description."""
    return [f"{cls}.{f.name} (line {f.line})" for cls, fields in schema_classes(source).items() for f in fields
            if not f.description or "\n" in f.description.strip()]


def _aliases(source: str) -> Dict[str, ast.expr]:
    """Module-level type aliases (``InitMethodName = Literal[...]``)."""
    return {node.targets[0].id: node.value for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Subscript)}


def _type(node: ast.expr, aliases: Dict[str, ast.expr], classes: Dict[str, list]) -> str:
    if isinstance(node, ast.Name):
        if node.id in aliases:
            return _type(aliases[node.id], aliases, classes)
        return "section" if node.id in classes else node.id
    if isinstance(node, ast.Subscript):
        outer = ast.unparse(node.value)
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Literal":
            return "one of " + ", ".join(_value(a) for a in inner)
        args = [_type(a, aliases, classes) for a in inner]
        if outer == "Optional":
            return f"{args[0]} or null"
        if outer == "List":
            return f"list of {args[0]}"
        if outer == "Dict":
            return f"map {args[0]} to {args[1]}"
    return ast.unparse(node)


def _value(node: ast.expr) -> str:
    """A default as YAML writes it (JSON flow style)."""
    return json.dumps(ast.literal_eval(node), ensure_ascii=False)


def _default(node: Optional[ast.expr], classes: Dict[str, list]) -> str:
    if node is None:
        return "required"
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "field":
        factory = next(k.value for k in node.keywords if k.arg == "default_factory")
        if isinstance(factory, ast.Lambda):
            return f"`{_value(factory.body)}`"
        name = ast.unparse(factory)
        return {"list": "`[]`", "dict": "`{}`"}.get(name, "see below" if name in classes else name)
    return f"`{_value(node)}`"


def translated_spellings() -> Dict[str, List[str]]:
    """Our key (YAML path) -> the NeoX / SepLLM keys that translate into it under another name."""
    out: Dict[str, List[str]] = {}
    for rule in RULES:
        if rule.kind != MAPPED or rule.key == rule.target or rule.target.startswith("-"):
            continue
        first, *more = rule.target.split(", ")
        prefix = first.rpartition(".")[0]
        for target in [first] + [f"{prefix}.{t}" if prefix and "." not in t else t for t in more]:
            if target != rule.key:
                out.setdefault(target, []).append(f"`{rule.key}` ({rule.dialect})")
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _tables(cls: str, path: str, title: str, classes, aliases, spellings) -> List[str]:
    """The table of one schema class, then those of its sections."""
    lines = [f"## {title}", "", "| key | type | default | description | NeoX / SepLLM spelling |",
             "| --- | --- | --- | --- | --- |"]
    sections = []
    for f in classes[cls]:
        key = f"{path}{f.name}"
        lines.append(f"| `{key}` | {_cell(_type(f.annotation, aliases, classes))} | "
                     f"{_cell(_default(f.default, classes))} | {_cell(f.description or '')} | "
                     f"{', '.join(spellings.get(key, []))} |")
        if isinstance(f.annotation, ast.Name) and f.annotation.id in classes:
            sections.append((f.annotation.id, key))
    for sub, key in sections:
        lines += [""] + _tables(sub, key + ".", f"`{key}` section", classes, aliases, spellings)
    return lines


def markdown(source: Optional[str] = None) -> str:
    """docs/config.md for the schema source (the installed schema.py by default)."""
    source = SCHEMA_PATH.read_text() if source is None else source
    classes, aliases, spellings = schema_classes(source), _aliases(source), translated_spellings()
    out = ["# Config keys", "",
           f"Generated from `megatron/config/schema.py` by `{REGENERATE}` (or `make docs`); "
           "`tests/test_config_docs.py` fails when the two differ.", "",
           "Keys of the flat groups are top-level YAML keys (`num_layers: 12`); `attention` and `optimizer` are "
           "nested sections, as are `zero_optimization` and `fp16` inside their groups (`fp16: {loss_scale: 0}`). "
           "`-` and `_` are interchangeable. The last column lists the GPT-NeoX / SepLLM-reference keys read "
           "into a key under another name; every NeoX key, the same-name ones too, is in "
           "[neox_compat.md](neox_compat.md).", ""]
    for group in classes["Config"]:
        cls = group.annotation.id
        nested = group.name in schema.NESTED_GROUPS
        title = f"{group.name}: {group.description.rstrip('.')}" + (f" (`{group.name}:` section)" if nested else "")
        out += _tables(cls, f"{group.name}." if nested else "", title, classes, aliases, spellings) + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    from megatron.errors import run_cli

    run_cli(main)

"""Read YAML config files (with the line of every key) and merge them left to right.

Translation of NeoX / SepLLM spellings is in ``neox_compat.py``, validation in ``validation.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml

from megatron.config.schema import FLAT_GROUPS, NESTED_GROUPS, Config
from megatron.config.validation import config_from_tree
from megatron.errors import ConfigError


def _norm_key(key: Any) -> Any:
    return key.replace("-", "_") if isinstance(key, str) else key


def _key_lines(node: yaml.Node, prefix: str, out: Dict[str, int]) -> None:
    """Line (1-based) of every mapping key below ``node``, by normalized dotted path."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        dotted = prefix + str(_norm_key(key_node.value))
        out.setdefault(dotted, key_node.start_mark.line + 1)
        _key_lines(value_node, dotted + ".", out)


def read_yaml_with_lines(path: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """The file's top-level mapping and the line of each (dotted, ``-`` -> ``_``) key in it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = p.read_text()
    lines: Dict[str, int] = {}
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node tree gives the key lines, its construction the data (= yaml.safe_load)
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
        if node is not None:
            _key_lines(node, "", lines)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, "
                          f"got {type(data).__name__}")
    return data, lines


def _normalize(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {_norm_key(k): _normalize(v) for k, v in tree.items()}
    return tree


@dataclass
class Merged:
    """Files merged left to right: the tree, and where each dotted key came from."""

    tree: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, str] = field(default_factory=dict)  # dotted key -> file that set it
    lines: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (file, dotted key) -> line
    files: List[str] = field(default_factory=list)  # in merge order


def merge(paths: List[str], log=print) -> Merged:
    """Merge YAML files left to right, keeping each key's file and line.

    Flat keys are replaced whole; the nested sections ``attention`` and ``optimizer`` merge
    key by key. Overrides are reported through ``log``.
    """
    out = Merged()
    merged, source = out.tree, out.source

    def merge_into(dst: Dict[str, Any], src: Dict[str, Any], prefix: str, path: str, deep: bool):
        for key, value in src.items():
            dotted = f"{prefix}{key}"
            if deep and isinstance(value, dict) and isinstance(dst.get(key, {}), dict):
                merge_into(dst.setdefault(key, {}), value, dotted + ".", path, deep)
                continue
            if key in dst and dotted in source and dst[key] != value:
                log(f"config: {dotted} = {value!r} from {path} overrides {dst[key]!r} from {source[dotted]}")
            dst[key] = value
            source[dotted] = path

    for path in paths:
        raw, lines = read_yaml_with_lines(path)
        out.files.append(path)
        out.lines.update({(path, dotted): line for dotted, line in lines.items()})
        for key, value in _normalize(raw).items():
            if key in NESTED_GROUPS and isinstance(value, dict):
                merge_into(merged.setdefault(key, {}), value, f"{key}.", path, deep=True)
            else:
                merge_into(merged, {key: value}, "", path, deep=False)
    return out


def load_config(paths: List[str], log=print) -> Tuple[Config, Dict[str, str]]:
    if not paths:
        raise ConfigError("no config files given; pass one or more YAML files")
    merged = merge(paths, log=log)
    cfg = config_from_tree(merged.tree, merged.source, log=log, lines=merged.lines, files=merged.files)
    return cfg, merged.source


def config_to_tree(cfg: Config) -> Dict[str, Any]:
    """The YAML-shaped (flat + nested sections) form of a config; inverse of config_from_tree."""
    tree: Dict[str, Any] = {}
    for group in FLAT_GROUPS:
        for key, value in dataclasses.asdict(getattr(cfg, group)).items():
            # Sub-sections of a flat group (zero_optimization) list only the keys that are set.
            tree[key] = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
    for group in NESTED_GROUPS:
        tree[group] = dataclasses.asdict(getattr(cfg, group))
    return tree


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_tree(cfg), sort_keys=False, default_flow_style=None)

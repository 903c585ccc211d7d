"""The state of one translation of a merged NeoX / SepLLM / our-dialect tree into our schema's tree.

Every raw key has a place (``file:line``) and an order (file index, line); every assignment to one
of our keys remembers the raw key it came from. Two assignments to the same key from different
files: the later file wins (logged, as any override); from the same file with different values:
a problem ("both X and Y set Z"). Derived assignments (NeoX rules that refine a value, such as
``bias_gelu_fusion`` turning ``gelu`` into its tanh form) replace the value without a conflict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.config.problems import UNKNOWN_ORDER, Problems
from megatron.config.schema import NESTED_GROUPS


@dataclass
class Assigned:
    value: Any
    origin: str  # the raw key that set it
    order: Tuple[int, int]


class Context:
    def __init__(self, tree: Dict[str, Any], source: Dict[str, str], lines: Dict[Tuple[str, str], int],
                 files: List[str], problems: Problems, log: Callable[[str], None]):
        self.raw, self.source, self.lines, self.problems, self.log = tree, source, lines, problems, log
        self.file_index = {f: i for i, f in enumerate(files)}
        for f in source.values():
            self.file_index.setdefault(f, len(self.file_index))
        self.out: Dict[str, Assigned] = {}
        self.noops: List[str] = []

    # ------------------------------------------------------------ provenance of raw keys
    def file_of(self, dotted: str) -> Optional[str]:
        while dotted:
            if dotted in self.source:
                return self.source[dotted]
            dotted = dotted.rpartition(".")[0]
        return None

    def line_of(self, dotted: str) -> Optional[int]:
        f = self.file_of(dotted)
        while f and dotted:
            if (f, dotted) in self.lines:
                return self.lines[(f, dotted)]
            dotted = dotted.rpartition(".")[0]
        return None

    def where(self, dotted: str) -> str:
        f, line = self.file_of(dotted), self.line_of(dotted)
        if f is None:
            return "config"
        return f"{f}:{line}" if line else f

    def order(self, dotted: str) -> Tuple[int, int]:
        f = self.file_of(dotted)
        if f is None:
            return UNKNOWN_ORDER
        return self.file_index.get(f, 1 << 20), self.line_of(dotted) or 0

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    # ------------------------------------------------------------ outcomes
    def problem(self, raw_key: str, message: str) -> None:
        self.problems.add(self.where(raw_key), message, self.order(raw_key))

    def noop(self, raw_key: str) -> None:
        self.noops.append(raw_key)

    def assign(self, target: str, value: Any, origin: str, derived: bool = False,
               order: Optional[Tuple[int, int]] = None) -> None:
        """Set our key ``target`` (dotted for nested sections) from raw key ``origin``."""
        order = order or self.order(origin)
        prev = self.out.get(target)
        if prev is None or derived:
            self.out[target] = Assigned(value, origin, order)
            return
        if prev.value == value:
            if order > prev.order:
                self.out[target] = Assigned(value, origin, order)
            return
        if order[0] == prev.order[0] and order[0] < (1 << 20):
            self.problem(origin, f"'{origin}' and '{prev.origin}' both set '{target}' "
                                 f"({value!r} vs {prev.value!r}); keep one")
            return
        later, earlier = (Assigned(value, origin, order), prev) if order > prev.order else (prev, Assigned(
            value, origin, order))
        self.out[target] = later
        self.log(f"config: {target} = {later.value!r} (from '{later.origin}', {self.where(later.origin)}) "
                 f"overrides {earlier.value!r} (from '{earlier.origin}', {self.where(earlier.origin)})")

    def locate(self, target: str) -> Tuple[str, Tuple[int, int]]:
        """Where our (possibly nested) key ``target`` was set: the raw key behind its longest assigned
        prefix, extended by the rest of the path (so ``zero_optimization.stag`` finds its own line)."""
        prefix, rest = target, ""
        while prefix and prefix not in self.out:
            prefix, _, tail = prefix.rpartition(".")
            rest = f".{tail}{rest}"
        if not prefix:
            return "config", UNKNOWN_ORDER
        raw = self.out[prefix].origin + rest
        return self.where(raw), self.order(raw)

    def value(self, target: str, default: Any = None) -> Any:
        """The value assigned to our key ``target`` so far (raw, unchecked)."""
        got = self.out.get(target)
        return default if got is None else got.value

    # ------------------------------------------------------------ result
    def tree(self) -> Tuple[Dict[str, Any], Dict[str, str], Dict[str, Tuple[int, int]]]:
        """Our YAML-shaped tree, and for each of its dotted keys where it was set and its order."""
        tree: Dict[str, Any] = {}
        where: Dict[str, str] = {}
        order: Dict[str, Tuple[int, int]] = {}
        for target, got in self.out.items():
            parts = target.split(".")
            if parts[0] in NESTED_GROUPS and len(parts) > 1:
                node = tree.setdefault(parts[0], {})
                for p in parts[1:-1]:
                    nxt = node.setdefault(p, {})
                    if not isinstance(nxt, dict):  # a scalar where a section belongs: keep the scalar
                        break
                    node = nxt
                else:
                    node[parts[-1]] = got.value
            else:
                tree[target] = got.value
            where[target], order[target] = self.where(got.origin), got.order
        return tree, where, order

#!/usr/bin/env python
"""Fill ``dispatch.TRITON_BEATS_FLEX`` and the Triton Sep-Attention tile configurations
(``triton_sep.CONFIGS``) from a GPU day-one report, instead of by hand.

    python tools/apply_gpu_report.py bench/out/gpu_day_one/gpu_day_one.json [--dry-run]

Decisions (all from the report's own measurements, on the device it names):
  * ``TRITON_BEATS_FLEX[device]`` is set when ``triton`` ran fwd+bwd at 16k faster than ``flex`` by more
    than ``--margin`` in every attention configuration measured there, and removed when ``flex`` was
    faster in any; otherwise left as it is.
  * A ``CONFIGS`` row (16-bit inputs) takes the tile sweep's best candidate when that candidate's result
    matched the shipped tiles' and it beat both timings of the shipped tiles by more than ``--margin``
    or the run's noise (the two shipped timings' spread), whichever is larger.
Nothing is applied unless every ``triton`` CUDA test of the report passed, and a tile row whose shipped
tiles differ from the file's (the code changed since the run) is left alone. Re-check spills on both
architectures after applying: ``python -m megatron.attention.triton_aot --arch 90`` and ``--arch 80``.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron.cli import cli_parser  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402

DISPATCH = Path("megatron/attention/dispatch.py")
TRITON_SEP = Path("megatron/attention/triton_sep.py")
TARGET_L = 16384
Key = Tuple[str, int, bool]


def load_report(path: Path) -> Dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the report ({type(exc).__name__}: {exc})") from exc
    device = report.get("env", {}).get("device_name") if isinstance(report, dict) else None
    if not device:
        raise UserError(f"{path}: env.device_name is missing: the report of a run on a CUDA machine is needed")
    return report


def steps_json(report: Dict[str, Any], part: str) -> List[Dict[str, Any]]:
    steps = report.get("parts", {}).get(part, {}).get("steps", [])
    return [{**s["json"], "_label": s.get("label", "")} for s in steps if isinstance(s.get("json"), dict)]


def check_triton_tests(report: Dict[str, Any], path: Path) -> None:
    tests = [t for doc in steps_json(report, "tests") for t in doc.get("tests", []) if "triton" in t["name"]]
    bad = [f"{t['name']} {t['outcome']}" for t in tests if t["outcome"] != "passed"]
    if not tests or bad:
        raise UserError(f"{path}: the triton CUDA tests {'did not run' if not tests else 'failed: ' + '; '.join(bad)}"
                        "; nothing applied (fix the kernels and rerun bench/gpu_day_one.sh)")


def triton_decision(report: Dict[str, Any], margin: float) -> Tuple[Optional[bool], List[Tuple[str, float]]]:
    """True: triton won fwd+bwd at 16k in every configuration by more than ``margin``; False: flex won in
    one; None: no figure, or within the margin. With the (configuration, triton / flex) figures."""
    ratios = []
    for doc in steps_json(report, "attention"):
        for length in doc.get("lengths", []):
            ratio = length.get("triton_over_flex", {}).get("fwdbwd")
            if length.get("L") == TARGET_L and ratio:
                ratios.append((doc["_label"], ratio))
    if ratios and all(r > 1 + margin for _, r in ratios):
        return True, ratios
    if any(r < 1 for _, r in ratios):
        return False, ratios
    return None, ratios


def tile_choices(report: Dict[str, Any], shipped: Dict[Key, Tuple[int, ...]], margin: float
                 ) -> Tuple[Dict[Key, Tuple[Tuple[int, ...], float]], List[str]]:
    """{CONFIGS key: (new tiles, speedup)} and one note per row left alone."""
    chosen: Dict[Key, Tuple[Tuple[int, ...], float]] = {}
    notes: List[str] = []
    for doc in steps_json(report, "tiles"):
        for row in doc.get("rows", []):
            key: Key = (row["kernel"], int(row["head_dim"]), True)
            name = f"{key[0]} D={key[1]}"
            notes += [f"{name}: tiles {c['config']} gave a different result from the shipped tiles' (relative "
                      f"error {c['rel_err_vs_shipped']:.1e}): a kernel bug at those tiles; not used"
                      for c in row.get("candidates", []) if c.get("matches") is False]
            if "error" in row or row.get("best") in (None, row.get("shipped")):
                continue
            if tuple(row["best"]) == shipped.get(key):
                notes.append(f"{name}: {row['best']} already in the file")
                continue
            if tuple(row["shipped"]) != shipped.get(key):
                notes.append(f"{name}: the report's shipped tiles {row['shipped']} are not the file's "
                             f"{list(shipped.get(key, ()))}; left alone (rerun the sweep)")
                continue
            best = next((c for c in row.get("candidates", []) if c["config"] == row["best"]), None)
            reference = min(row["shipped_ms"], row.get("shipped_ms_again") or row["shipped_ms"])
            threshold = max(margin, row.get("noise") or 0.0)
            if not best or not best.get("matches") or best["ms"] > reference * (1 - threshold):
                notes.append(f"{name}: best {row['best']} is not faster than the shipped tiles by more than "
                             f"{threshold:.0%}; left alone")
                continue
            chosen[key] = (tuple(best["config"]), reference / best["ms"])
    return chosen, notes


def assignment(tree: ast.Module, name: str, path: Path) -> ast.AnnAssign:
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
    raise UserError(f"{path}: no annotated assignment '{name}: ... = ...' found to rewrite")


def rewrite_beats_flex(text: str, path: Path, device: str, decision: Optional[bool], provenance: str) -> str:
    node = assignment(ast.parse(text), "TRITON_BEATS_FLEX", path)
    table: Dict[str, str] = ast.literal_eval(node.value)
    if decision is True:
        table[device] = provenance
    elif decision is False:
        table.pop(device, None)
    lines = text.splitlines(keepends=True)
    head = lines[node.lineno - 1][:node.col_offset] + ast.get_source_segment(text, node).split("=", 1)[0] + "= "
    body = "{}" if not table else "{\n" + "".join(f"    {json.dumps(k)}: {json.dumps(v)},\n"
                                                 for k, v in sorted(table.items())) + "}"
    return "".join(lines[:node.lineno - 1]) + head + body + "\n" + "".join(lines[node.end_lineno:])


def shipped_configs(text: str, path: Path) -> Dict[Key, Tuple[int, ...]]:
    node = assignment(ast.parse(text), "CONFIGS", path)
    if not isinstance(node.value, ast.Dict):
        raise UserError(f"{path}: CONFIGS is not a dict literal")
    return {ast.literal_eval(k): tuple(ast.literal_eval(a) for a in v.args)
            for k, v in zip(node.value.keys, node.value.values)}


def rewrite_configs(text: str, path: Path, chosen: Dict[Key, Tuple[Tuple[int, ...], float]], tag: str) -> str:
    node = assignment(ast.parse(text), "CONFIGS", path)
    lines = text.splitlines(keepends=True)
    for key_node, call in zip(node.value.keys, node.value.values):
        key = ast.literal_eval(key_node)
        if key not in chosen:
            continue
        if call.lineno != call.end_lineno:
            raise UserError(f"{path}: the CONFIGS row {key} spans several lines; cannot rewrite it")
        tiles, gain = chosen[key]
        line = lines[call.lineno - 1]
        code = line[:call.col_offset] + f"KernelConfig({', '.join(map(str, tiles))})" + line[call.end_col_offset:]
        code = code.rstrip("\n").split("  # ")[0].rstrip()
        lines[call.lineno - 1] = f"{code}  # {tag}: {gain:.2f}x\n"
    return "".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("report", help="gpu_day_one.json written by bench/gpu_day_one.sh")
    p.add_argument("--root", default=str(ROOT), help="repository to rewrite (default: this one)")
    p.add_argument("--margin", type=float, default=0.05, help="smallest speedup that counts (default 5%%)")
    p.add_argument("--dry-run", action="store_true", help="print the decisions, change nothing")
    args = p.parse_args(argv)
    path = Path(args.report)
    report = load_report(path)
    check_triton_tests(report, path)
    device, date = report["env"]["device_name"], report.get("date", "?")
    from megatron.checkpointing.integrity import atomic_write_text

    root = Path(args.root)
    dispatch_path, sep_path = root / DISPATCH, root / TRITON_SEP
    decision, ratios = triton_decision(report, args.margin)
    figures = ", ".join(f"{r:.2f}x" for _, r in ratios)
    provenance = f"bench/RESULTS.md, GPU day one {date}: fwd+bwd at 16k, triton over flex {figures}"
    sep_text = sep_path.read_text()
    chosen, notes = tile_choices(report, shipped_configs(sep_text, sep_path), args.margin)
    verdict = {True: f"triton faster: {device} added", False: f"flex faster: {device} removed if listed",
               None: f"no clear winner (margin {args.margin:.0%}): unchanged"}[decision]
    words = ", ".join(f"{r:.2f}x ({label})" for label, r in ratios) or f"no triton vs flex figure at L={TARGET_L}"
    print(f"TRITON_BEATS_FLEX: triton over flex, fwd+bwd: {words}; {verdict}")
    for key, (tiles, gain) in sorted(chosen.items()):
        print(f"CONFIGS{key}: {list(shipped_configs(sep_text, sep_path)[key])} -> {list(tiles)} ({gain:.2f}x)")
    for note in notes:
        print(f"CONFIGS: {note}")
    if args.dry_run:
        return 0
    dispatch_text = dispatch_path.read_text()
    new_dispatch = rewrite_beats_flex(dispatch_text, dispatch_path, device, decision, provenance)
    new_sep = rewrite_configs(sep_text, sep_path, chosen, f"{device}, GPU day one {date}")
    for file, old, new in ((dispatch_path, dispatch_text, new_dispatch), (sep_path, sep_text, new_sep)):
        ast.parse(new)  # never write a file that does not parse
        if new != old:
            atomic_write_text(file, new)
            print(f"rewrote {file}")
    if chosen:
        print("re-check spills: python -m megatron.attention.triton_aot --arch 90 && "
              "python -m megatron.attention.triton_aot --arch 80")
    return 0


if __name__ == "__main__":
    run_cli(main)

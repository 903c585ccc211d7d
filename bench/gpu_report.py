"""The GPU day-one report (``bench/gpu_day_one.py``): one markdown file for bench/RESULTS.md and one JSON
holding every figure and every failure, both rewritten after each step. Pure formatting: reads the
results dictionary the driver builds (``parts.<name>.steps[i].json`` is what that step's script wrote).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

ATTENTION_TARGET_SPEEDUP = 3.0  # fwd+bwd vs dense causal at 16k (bench/RESULTS.md, Sep-Attention)
ATTENTION_TARGET_RATE = 0.60  # FLOP rate over attended pairs vs dense causal, fwd+bwd at 16k
TARGET_L = 16384
KERNEL_TARGET_SPEEDUP = 1.5  # fused vs eager (bench/RESULTS.md, Fused kernels)
KERNEL_TARGET_FLOOR = 1.1  # fused time within 10% of the bandwidth floor


def part_status(steps: List[Dict[str, Any]]) -> str:
    statuses = [s["status"] for s in steps]
    for worst in ("failed", "timed out"):
        if worst in statuses:
            return worst
    return "partial (out of time)" if "skipped" in statuses else "ok"


def step_json(results: Dict[str, Any], part: str) -> List[Dict[str, Any]]:
    """The JSON of every step of ``part`` that wrote one, with the step's label."""
    out = []
    for step in results.get("parts", {}).get(part, {}).get("steps", []):
        if isinstance(step.get("json"), dict):
            out.append({**step["json"], "_label": step["label"]})
    return out


def fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ------------------------------------------------------------------------------------------ failures

def failures(results: Dict[str, Any]) -> List[str]:
    """Everything that went wrong, one line each: steps that failed or timed out, failed tests, wrong
    kernel results, training runs that did not finish, layouts that differ from one GPU."""
    found: List[str] = []
    env = results.get("env", {})
    if env.get("torch_error"):
        found.append(f"env: torch does not import: {env['torch_error']}")
    elif "env" in results.get("parts", {}) and not env.get("cuda_available"):
        found.append("env: no CUDA device usable by torch: nothing on the GPU ran")
    found += [f"env: {line}" for line in env.get("installs", []) if "FAILED" in line]
    for name, part in results.get("parts", {}).items():
        for step in part.get("steps", []):
            if step["status"] in ("failed", "timed out"):
                extra = f" after {step.get('wall_s')} s (limit {step.get('limit_s')} s)" \
                    if step["status"] == "timed out" else f" (exit {step.get('rc')})"
                found.append(f"{name} / {step['label']}: {step['status']}{extra}")
            if step.get("json_error"):
                found.append(f"{name} / {step['label']}: its results could not be read: {step['json_error']}")
    for doc in step_json(results, "tests"):
        found += [f"tests: {t['outcome']} {t['name']}: {t['message']}" for t in doc.get("tests", [])
                  if t["outcome"] in ("failed", "error")]
    for doc in step_json(results, "kernels"):
        found += [f"kernels: {c['family']} {c['case']}: {c['check']} ({c['worst_error_over_tolerance']:.2f})"
                  for c in doc.get("cases", []) if c.get("check") != "ok"]
    for doc in step_json(results, "tiles"):
        for row in doc.get("rows", []):
            if "error" in row:
                found.append(f"tiles: {row['kernel']} D={row['head_dim']} shipped tiles: {row['error']}")
            found += [f"tiles: {row['kernel']} D={row['head_dim']} tiles {c['config']} differ from the shipped "
                      f"tiles' result (relative error {c['rel_err_vs_shipped']:.1e})"
                      for c in row.get("candidates", []) if c.get("matches") is False]
    for doc in step_json(results, "train") + step_json(results, "layouts"):
        for run in doc.get("runs", []):
            name = run.get("name") or run.get("layout")
            if run.get("rc") not in (0, None):
                tail = (run.get("output_tail") or "").strip().splitlines()[-1:] or [""]
                found.append(f"{doc['bench']}: {name}: exit {run['rc']}: {tail[0][:200]}")
            if run.get("equal") is False:
                found.append(f"layouts: {name} differs from one GPU (worst relative difference "
                             f"{run['worst_rel_diff']:.2e})")
    return found


# ------------------------------------------------------------------------------------------ sections

def header(results: Dict[str, Any]) -> List[str]:
    env = results.get("env", {})
    mods = env.get("modules", {})
    smi = env.get("nvidia_smi", {})
    device = env.get("device_name") or smi.get("name") or "no CUDA device"
    lines = [f"### GPU day one: {device}, {results.get('date')}", "",
             f"`bench/gpu_day_one.sh` (commit {env.get('git_commit') or 'not a git checkout'}): "
             f"{results.get('elapsed_s', 0):.0f} s of {results.get('deadline_s', 0):.0f} s allowed "
             f"(target: under {results.get('target_s', 480)} s)."]
    if env:
        lines += ["", f"Machine: {device} x {env.get('cuda_devices', 0)}"
                      + (f" (compute {env['capability']}, {env['sm_count']} SMs, {env['memory_gib']:.0f} GiB)"
                         if env.get("sm_count") else "")
                      + f", driver {smi.get('driver_version', '?')}, CUDA {env.get('torch_cuda') or '-'}, "
                        f"torch {mods.get('torch') or '-'}, triton {mods.get('triton') or '-'}, flash_attn "
                        f"{mods.get('flash_attn') or 'not installed'}, Python {env.get('python')}."]
        if env.get("ceilings"):
            c = env["ceilings"]
            lines.append(f"Measured ceilings: device-to-device copy {c['copy_gbps']:.0f} GB/s (bytes read + "
                         f"written), bf16 8192^3 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s (random data).")
        if env.get("installs"):
            lines.append("Installed for this run: " + "; ".join(env["installs"]) + ".")
    rows = [[name, str(p.get("budget_s", "-")), fmt(p.get("used_s"), ".0f"),
             p.get("status", "-") + (f": {p['reason']}" if p.get("reason") else "")]
            for name, p in results.get("parts", {}).items()]
    lines += [""] + table(["part", "budget s", "used s", "status"], rows)
    found = failures(results)
    lines += ["", f"**Failures: {len(found)}**" + ("" if found else " (every check passed)")]
    lines += [f"- {line}" for line in found]
    return lines


def tests_section(results: Dict[str, Any]) -> List[str]:
    docs = step_json(results, "tests")
    if not docs:
        return []
    counts = docs[0].get("counts", {})
    lines = ["", "#### CUDA tests (`pytest -k cuda`)", "",
             ", ".join(f"{k} {v}" for k, v in counts.items()) + "."]
    skipped = [t for t in docs[0].get("tests", []) if t["outcome"] == "skipped"]
    lines += [f"- skipped {t['name']}: {t['message']}" for t in skipped]
    return lines


def attention_section(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for doc in step_json(results, "attention"):
        st = doc.get("settings", {})
        lines += ["", f"#### Sep-Attention, {doc['_label']} (`bench/attention.py`)", "",
                  f"{st.get('dtype')}, B={st.get('batch')}, Hq={st.get('heads')}, Hkv={st.get('kv_heads')}, "
                  f"D={st.get('dim')}, n_init {st.get('n_init')}, n_local {st.get('n_local')}, real-text "
                  f"separators, median of {st.get('repeats')}. Speedup = dense causal time / this time (baseline "
                  "in the last column); FLOP rate counts attended pairs only, in brackets its ratio to the "
                  "baseline's.", ""]
        rows, verdicts, skips = [], [], set()
        for length in sorted(doc.get("lengths", []), key=lambda x: x["L"]):
            for name, r in length["impls"].items():
                rows.append([str(length["L"]), f"{100 * length['sep_pairs_over_causal']:.1f}%", name,
                             fmt(r.get("fwd_ms"), ".2f"), fmt(r.get("fwd_speedup"), ".2f", "x"),
                             fmt(r.get("fwdbwd_ms"), ".2f"), fmt(r.get("fwdbwd_speedup"), ".2f", "x"),
                             f"{fmt(r.get('fwdbwd_gflops'), '.0f')} ({fmt(r.get('fwdbwd_rate_vs_dense'))})",
                             fmt(r.get("bwd_over_fwd")), length.get("dense_baseline") or "-"])
            skips.update(f"{k}: {v}" for k, v in length.get("skipped", {}).items())
            if length["L"] == TARGET_L:
                for name in ("flex", "triton"):
                    r = length["impls"].get(name)
                    if r and r.get("fwdbwd_speedup") is not None:
                        met = r["fwdbwd_speedup"] >= ATTENTION_TARGET_SPEEDUP
                        rate_met = (r.get("fwdbwd_rate_vs_dense") or 0) >= ATTENTION_TARGET_RATE
                        verdicts.append(f"- {name} at 16k, fwd+bwd: {r['fwdbwd_speedup']:.2f}x dense causal "
                                        f"(target >= {ATTENTION_TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'}), "
                                        f"FLOP rate {r['fwdbwd_rate_vs_dense']:.2f} of dense (target >= "
                                        f"{ATTENTION_TARGET_RATE:.2f}: {'met' if rate_met else 'NOT met'})")
                if "triton_over_flex" in length:
                    tf = length["triton_over_flex"]
                    verdicts.append(f"- triton vs flex at 16k: fwd {fmt(tf.get('fwd'))}x, fwd+bwd "
                                    f"{fmt(tf.get('fwdbwd'))}x ({'triton' if tf.get('fwdbwd', 0) > 1 else 'flex'} "
                                    "faster)")
        lines += table(["L", "Sep pairs / causal", "impl", "fwd ms", "fwd speedup", "fwd+bwd ms", "fwd+bwd speedup",
                        "fwd+bwd GFLOP/s (vs dense)", "bwd / fwd", "baseline"], rows)
        lines += [""] + verdicts if verdicts else []
        lines += [f"- not run: {s}" for s in sorted(skips)]
    return lines


def tiles_section(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for doc in step_json(results, "tiles"):
        lines += ["", f"#### Triton Sep-Attention tiles (`bench/triton_tiles.py`, L={doc.get('seq')}, bf16)", "",
                  "Tiles as M x N / warps / stages; fwd timed forward only, dq and dkdv forward + backward; "
                  "shipped timed first and last (noise).", ""]
        rows = []
        for row in doc.get("rows", []):
            cands = row.get("candidates", [])
            best = next((c for c in cands if c["config"] == row.get("best")), None)
            tile = lambda c: f"{c[0]}x{c[1]}/{c[2]}/{c[3]}"  # noqa: E731
            rows.append([row["kernel"], str(row["head_dim"]), tile(row["shipped"]),
                         f"{fmt(row.get('shipped_ms'), '.3f')} / {fmt(row.get('shipped_ms_again'), '.3f')}",
                         tile(row["best"]) if row.get("best") else "-",
                         fmt(best["ms"], ".3f") if best else "(shipped)",
                         fmt(row["shipped_ms"] / best["ms"], ".2f", "x") if best else "-",
                         f"{sum(c.get('matches') is False for c in cands)} / {sum('error' in c for c in cands)}"])
        lines += table(["kernel", "D", "shipped", "shipped ms (again)", "best", "best ms", "gain",
                        "wrong / errors"], rows)
        for chunk in doc.get("chunks", []):
            ms = chunk["ms"]
            best = min(ms, key=ms.get) if ms else None
            lines.append(f"\nSpecial-pass query chunks, D={chunk['head_dim']} (default picks "
                         f"{chunk['default_chunks']}): " + ", ".join(f"{k}: {v:.3f} ms" for k, v in ms.items())
                         + (f"; fastest {best}" if best else ""))
    return lines


def kernels_section(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for doc in step_json(results, "kernels"):
        if doc.get("bench") == "kernels":
            lines += ["", f"#### Fused kernels (`bench/kernels.py --quick`, {doc.get('dtype')}, peak "
                          f"{doc.get('peak_gbps'):.0f} GB/s)", ""]
            cases = doc.get("cases", [])
            rows = [[f"{c['family']} {c['case']}", f"{c['check']} {c['worst_error_over_tolerance']:.2f}",
                     fmt(c["fused_ms"], ".3f"), fmt(c["eager_ms"], ".3f"), fmt(c.get("compile_ms"), ".3f"),
                     fmt(c["speedup_vs_eager"], ".2f", "x"), fmt(c.get("speedup_vs_compile"), ".2f", "x"),
                     fmt(c["floor_ms"], ".3f"), fmt(c["gbps"], ".0f"), fmt(c["pct_of_peak"], ".1f", "%"),
                     c["extra_mb_fused_eager"]] for c in cases]
            lines += table(["case", "check", "fused ms", "eager ms", "compile ms", "x eager", "x compile",
                            "floor ms", "GB/s", "% peak", "extra MB f/e"], rows)
            met = [c for c in cases if c["speedup_vs_eager"] >= KERNEL_TARGET_SPEEDUP
                   and c["fused_ms"] <= KERNEL_TARGET_FLOOR * c["floor_ms"]]
            lines.append(f"\nTargets (x eager >= {KERNEL_TARGET_SPEEDUP}, fused <= {KERNEL_TARGET_FLOOR} x floor): "
                         f"met by {len(met)} of {len(cases)} cases.")
        else:
            best: Dict[str, Dict[str, Any]] = {}
            for r in doc.get("rows", []):
                if r["case"] not in best or r["fwdbwd_ms"] < best[r["case"]]["fwdbwd_ms"]:
                    best[r["case"]] = r
            lines += ["", "Norm launch sweep (`--sweep-norm --quick`), fastest per case: " + "; ".join(
                f"{case}: {r['num_warps']} warps, {r['programs_per_sm']} programs/SM, {r['fwdbwd_ms']:.3f} ms"
                for case, r in best.items())]
    return lines


def train_section(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for doc in step_json(results, "train"):
        lines += ["", f"#### Training throughput (`bench/train_gpu.py throughput`: {doc.get('base_config')}, "
                      f"{doc.get('steps')} steps, {doc.get('tokens_per_step'):,} tokens per step, bf16)", "",
                  "Last logging window (the first holds compilation); vocabulary 4096 (the shipped sample "
                  "tokenizer), so the LM head is smaller than Pythia's.", ""]
        full = {r["seq"]: r.get("tokens_per_sec") for r in doc.get("runs", []) if r.get("variant") == "full"}
        rows = []
        for r in doc.get("runs", []):
            base = full.get(r["seq"])
            rows.append([str(r["seq"]), r["variant"], str(r["micro_batch"]), fmt(r.get("tokens_per_sec"), ",.0f"),
                         fmt(r.get("ms_per_iter"), ".0f"), fmt(r.get("tflops_per_device"), ".0f"),
                         fmt(100 * r["mfu"] if r.get("mfu") is not None else None, ".1f", "%"),
                         fmt(r.get("peak_memory_gib"), ".1f"),
                         f"{fmt(r.get('loss_first'), '.3f')} -> {fmt(r.get('loss_last'), '.3f')}",
                         fmt(r["tokens_per_sec"] / base if base and r.get("tokens_per_sec") else None, ".2f", "x"),
                         "ok" if r.get("rc") == 0 else str(r.get("rc"))])
        lines += table(["seq", "attention", "micro", "tokens/s", "ms/iter", "TFLOP/s/GPU", "MFU", "peak GiB",
                        "loss first -> last", "tokens/s vs full", "run"], rows)
    return lines


def layouts_section(results: Dict[str, Any]) -> List[str]:
    part = results.get("parts", {}).get("layouts", {})
    lines = ["", "#### Parallel layouts over NCCL (`bench/train_gpu.py layouts`)", ""]
    if part.get("status") == "skipped":
        return lines + [f"Skipped: {part.get('reason')}."]
    for doc in step_json(results, "layouts"):
        if doc.get("skipped"):
            lines.append(f"Skipped: {doc['skipped']}.")
        rows = [[r["layout"], str(r.get("procs")), str(r.get("rc")), fmt(r.get("worst_rel_diff"), ".1e"),
                 {True: "equal", False: "DIFFERENT", None: "reference"}[r.get("equal")]] for r in doc.get("runs", [])]
        if rows:
            lines += table(["layout", "GPUs", "exit", "worst relative difference (loss, grad norm)", "vs 1 GPU"],
                           rows)
    return lines if len(lines) > 3 else []


def render_markdown(results: Dict[str, Any]) -> str:
    lines = header(results)
    for section in (tests_section, attention_section, tiles_section, kernels_section, train_section,
                    layouts_section):
        lines += section(results)
    return "\n".join(lines) + "\n"


def write(out: Path, results: Dict[str, Any]) -> None:
    """gpu_day_one.json (with the failures list) and gpu_day_one.md, each replaced atomically."""
    from megatron.checkpointing.integrity import atomic_write_text

    results["failures"] = failures(results)
    atomic_write_text(out / "gpu_day_one.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out / "gpu_day_one.md", render_markdown(results))


def summary_text(results: Dict[str, Any], out: Path) -> str:
    """What the run prints last (a device tool shows the end of the output)."""
    return "\n".join(header(results) + ["", f"report: {out / 'gpu_day_one.md'}, {out / 'gpu_day_one.json'}, "
                                            f"log {out / 'gpu_day_one.log'}"])


def plan_text(parts, deadline: float, target: int) -> str:
    lines = [f"GPU day one plan: deadline {deadline:.0f} s (target under {target} s on one H200); each step runs "
             "under `timeout` at min(its cap, what is left of its part, what is left of the run)", ""]
    total = 0
    for part in parts:
        total += part.budget_s if part.name != "layouts" else 0
        lines.append(f"{part.name:<10} {part.budget_s:>4} s  {part.what}")
        for step in part.steps:
            lines.append(f"    [{step.cap_s:>3} s] {step.label}: {shlex.join(step.argv)}")
    lines += ["", f"one GPU: {total} s of budgets (layouts skipped); 2+ GPUs: + "
                  f"{next(p.budget_s for p in parts if p.name == 'layouts')} s for layouts, cut at the deadline"]
    return "\n".join(lines)

"""Shared fixtures: a tiny indexed dataset made from the bundled sample, and config writers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Fixtures of the evaluation tests (a tiny checkpoint, local task data), shared by several test files.
pytest_plugins = ["eval_helpers"]

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a CPU communication op on first use; a cache per environment keeps one build
# (the shared default cache is rebuilt whenever another virtual environment used it last).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
SAMPLE = ROOT / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.json"


def pytest_collection_modifyitems(config, items):
    """``heavy`` narrows ``slow`` (pytest.ini): a heavy test not marked slow would run in the default tier."""
    loose = [item.nodeid for item in items if item.get_closest_marker("heavy") and not item.get_closest_marker("slow")]
    if loose:
        raise pytest.UsageError(f"marked heavy but not slow: {', '.join(loose)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """Prefix of an indexed dataset built from the first documents of the bundled sample."""
    out = tmp_path_factory.mktemp("tiny_data")
    src = out / "docs.jsonl"
    lines = (SAMPLE / "corpus.jsonl").read_text().splitlines()[:200]
    src.write_text("\n".join(lines) + "\n")
    prefix = out / "sample"
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
                    "--output-prefix", str(prefix), "--tokenizer-type", "HFTokenizer",
                    "--vocab-file", str(TOKENIZER), "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT)
    return f"{prefix}_text_document"


def tiny_config_tree(data_prefix: str, **overrides) -> dict:
    tree = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, rotary_pct=0.5,
        gpt_j_residual=True, make_vocab_size_divisible_by=8,
        attention={"impl": "reference", "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 8}},
        optimizer={"type": "adamw", "params": {"lr": 3.0e-3}},
        train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_iters=6,
        lr_decay_style="cosine", warmup=0.2, min_lr=1.0e-4, eval_interval=1000, eval_iters=1,
        data_path=data_prefix, split="90,10,0", tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER),
        log_interval=1, seed=7,
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def write_config(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def load_script(path: str):
    """A script of this repository (``tools/x.py``, ``eval.py``) loaded as a module, to call its main in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("script_" + path.replace("/", "_")[:-3], ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(args, timeout=600, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env)


@pytest.fixture(autouse=True)
def _stop_signal_handlers_are_restored():
    """A test (or the code it calls in-process) that leaves its own SIGTERM/SIGINT/SIGUSR1 handler in the
    pytest process can end a later test's signal in os._exit: name the culprit instead."""
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    changed = [signal.Signals(s).name for s in watched if signal.getsignal(s) != before[s]]
    for s in watched:
        signal.signal(s, before[s])
    assert not changed, f"the test left its own handler for {', '.join(changed)}"


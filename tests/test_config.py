import copy
import functools
import json
import re
import textwrap
from pathlib import Path

import pytest

from megatron.config import Config, config_from_tree, config_to_tree, load_config, validate_layout
from megatron.config.validation import validate
from megatron.errors import ConfigError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_merge_left_to_right_reports_override(tmp_path):
    a = write(tmp_path, "a.yml", """
        num_layers: 2
        hidden-size: 64
        attention: {impl: reference, sepllm: {n_local: 16, n_init: 2}}
        optimizer: {type: adam, params: {lr: 1.0e-3}}
    """)
    b = write(tmp_path, "b.yml", """
        num_layers: 4
        attention: {sepllm: {n_local: 32}}
    """)
    logs = []
    cfg, source = load_config([a, b], log=logs.append)
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64
    # nested sections merge key by key: n_init from a, n_local from b
    assert cfg.attention.sepllm.n_local == 32 and cfg.attention.sepllm.n_init == 2
    assert cfg.attention.impl == "reference" and cfg.optimizer.params.lr == 1e-3
    assert source["num_layers"] == b and source["hidden_size"] == a
    assert any("num_layers" in m and b in m and a in m for m in logs)
    assert any("attention.sepllm.n_local" in m for m in logs)


def test_unknown_key_names_file_and_suggests(tmp_path):
    a = write(tmp_path, "a.yml", "num_layers: 2\n")
    b = write(tmp_path, "b.yml", "hiden_size: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config([a, b], log=lambda m: None)
    # one problem is one line, with the file and the key's line (the wording is unchanged otherwise)
    assert str(e.value) == f"{b}:1: unknown key 'hiden_size'; did you mean 'hidden_size'?"


def test_unknown_nested_key_suggests(tmp_path):
    a = write(tmp_path, "a.yml", "attention: {sepllm: {n_locl: 3}}\n")
    with pytest.raises(ConfigError, match=r"a.yml:1: unknown key 'attention.sepllm.n_locl'; did you mean 'n_local'"):
        load_config([a], log=lambda m: None)


@pytest.mark.parametrize("text, key, expected", [
    ("num_layers: two\n", "num_layers", "expected int"),
    ("num_layers: 1.5\n", "num_layers", "expected int"),
    ("norm: rmsnrm\n", "norm", "did you mean 'rmsnorm'"),
    ("gpt_j_residual: 1\n", "gpt_j_residual", "expected bool"),
    ("attention: {sepllm: {full_attention_layers: 0}}\n", "attention.sepllm.full_attention_layers", "a list of int"),
])
def test_type_errors_name_key_value_expected(tmp_path, text, key, expected):
    a = write(tmp_path, "a.yml", text)
    with pytest.raises(ConfigError) as e:
        load_config([a], log=lambda m: None)
    assert f"'{key}'" in str(e.value) and expected in str(e.value) and "a.yml" in str(e.value)


def test_range_errors():
    with pytest.raises(ConfigError, match="divisible by num_attention_heads"):
        config_from_tree({"hidden_size": 100, "num_attention_heads": 3})
    with pytest.raises(ConfigError, match="rotary_pct"):
        config_from_tree({"rotary_pct": 1.5})
    with pytest.raises(ConfigError, match="n_local >= 1"):
        config_from_tree({"attention": {"sepllm": {"n_local": 0}}})
    with pytest.raises(ConfigError, match="full_attention_layers has 5"):
        config_from_tree({"num_layers": 2, "attention": {"sepllm": {"full_attention_layers": [5]}}})
    with pytest.raises(ConfigError, match="train_iters"):
        config_from_tree({"train_iters": 0})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yml"):
        load_config([str(tmp_path / "nope.yml")], log=lambda m: None)
    bad = write(tmp_path, "bad.yml", "num_layers: [1, 2\nhidden_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yml: invalid YAML at line \d+"):
        load_config([bad], log=lambda m: None)
    lst = write(tmp_path, "list.yml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([lst], log=lambda m: None)


def test_pipe_parallel_zero_means_one_and_string_floats():
    logs = []
    cfg = config_from_tree({"pipe_parallel_size": 0, "optimizer": {"params": {"lr": "6e-4"}}}, log=logs.append)
    assert cfg.parallel.pipe_parallel_size == 1
    assert logs == ["config: pipe_parallel_size = 0 read as 1 (no pipeline split)"]
    assert cfg.optimizer.params.lr == pytest.approx(6e-4)
    with pytest.raises(ConfigError, match="key 'pipe_parallel_size' = False is not valid; expected int"):
        config_from_tree({"pipe_parallel_size": False})


ROOT = Path(__file__).resolve().parents[1]
# Our configs, and NeoX-dialect ones whose translation decides what validation used to change in place
# (pythia_14m_style: pipe-parallel-size 0; the others: an fp16 section with enabled / fp16 / bfloat16).
CONFIG_SETS = [[str(p)] for p in sorted((ROOT / "configs").glob("**/*.yml"))] + [
    [str(ROOT / "tests/data/pythia" / f) for f in files] for files in (
        ["pythia_14m_style.yml"], ["pythia_160m_style.yml", "cpu_overlay.yml"])] + [
    [str(ROOT / "tests/data/neox_dialect" / f) for f in files] for files in (
        ["my_neox_160M.yml"], ["neox_llama_7B.yml", "neox_local_setup.yml"], ["neox_mistral_window.yml"],
        ["sepllm_n64HT.yml"])]


@pytest.mark.parametrize("paths", CONFIG_SETS, ids=lambda paths: "+".join(Path(p).stem for p in paths))
def test_validation_reads_the_config_and_changes_nothing(paths):
    cfg, source = load_config(paths, log=lambda m: None)
    before = copy.deepcopy(cfg)
    validate(cfg, source)
    assert cfg == before


@pytest.mark.parametrize("field, value, expected", [
    ("parallel.pipe_parallel_size", 0, "key 'pipe_parallel_size' = 0 is not valid; expected an integer >= 1"),
    ("training.precision", "fp16", "fp16.enabled is false but precision is fp16; set precision: fp16 with "
                                   "enabled: true, or neither"),
    ("training.fp16.enabled", True, "fp16.enabled is true but precision is fp32"),
])
def test_validation_refuses_what_only_the_translation_may_decide(field, value, expected):
    """A Config built in Python skips the translation: validation says what is wrong and fixes nothing."""
    cfg = Config()
    *parents, name = field.split(".")
    setattr(functools.reduce(getattr, parents, cfg), name, value)
    before = copy.deepcopy(cfg)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(cfg)
    assert cfg == before


def test_translation_sets_precision_and_fp16_enabled_together():
    cfg = config_from_tree({"precision": "fp16"})
    assert (cfg.training.precision, cfg.training.fp16.enabled) == ("fp16", True)
    cfg = config_from_tree({"fp16": {"enabled": True, "loss_scale_window": 50}})
    assert (cfg.training.precision, cfg.training.fp16.enabled, cfg.training.fp16.loss_scale_window) == \
        ("fp16", True, 50)


def test_round_trip_tree():
    cfg = config_from_tree({"num_layers": 3, "attention": {"sepllm": {"layer_n_local": {0: 8}}}})
    assert config_from_tree(config_to_tree(cfg)) == cfg
    # a checkpoint manifest is JSON, which writes the integer layer keys as strings
    assert config_from_tree(json.loads(json.dumps(config_to_tree(cfg)))) == cfg


def test_layout_validation():
    cfg = config_from_tree({"num_attention_heads": 4, "hidden_size": 64, "num_layers": 3})
    assert validate_layout(cfg, 4) == 4
    cfg.parallel.model_parallel_size = 3
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by model_parallel_size 3"):
        validate_layout(cfg, 3)
    cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size = 1, 2
    with pytest.raises(ConfigError, match="num_layers 3 is not divisible by pipe_parallel_size 2"):
        validate_layout(cfg, 2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate_layout(cfg, 3)
    cfg.parallel.pipe_parallel_size = 1
    cfg.training.train_batch_size = 7
    with pytest.raises(ConfigError, match="train_batch_size 7"):
        validate_layout(cfg, 2)


def test_shipped_configs_load():
    """Every shipped config loads, and the overlays set what their names say."""
    quiet = dict(log=lambda m: None)
    tiny, _ = load_config(["configs/tiny.yml"], **quiet)
    assert (tiny.model.num_layers, tiny.model.hidden_size, tiny.attention.sepllm.mode) == (4, 192, "sepllm")
    assert tiny.attention.sepllm.n_local == 32 and tiny.training.train_iters == 300
    pythia, _ = load_config(["configs/pythia/160M.yml", "configs/sepllm/n64_HT.yml"], **quiet)
    assert (pythia.model.num_layers, pythia.model.hidden_size, pythia.model.num_attention_heads) == (12, 768, 12)
    assert pythia.model.rotary_pct == 0.25 and pythia.model.gpt_j_residual and pythia.model.no_weight_tying
    assert pythia.parallel.zero_optimization.stage == 1 and pythia.parallel.zero_optimization.overlap_comm
    sep = pythia.attention.sepllm
    assert (sep.mode, sep.n_init, sep.n_local, sep.full_attention_layers) == ("sepllm", 3, 64, [0, -1])
    fixed, _ = load_config(["configs/tiny.yml", "configs/sepllm/fixed_interval.yml"], **quiet)
    assert (fixed.attention.sepllm.mode, fixed.attention.sepllm.interval) == ("fixed_interval", 5)
    assert fixed.model.hidden_size == 192  # the overlay changes attention only
    full, _ = load_config(["configs/tiny.yml", "configs/sepllm/full_attention.yml"], **quiet)
    assert (full.attention.impl, full.attention.sepllm.mode) == ("sdpa", "full")
    for overlay, (mode, n_local) in {"n64": ("sepllm", 64), "n128": ("sepllm", 128),
                                     "streamingllm_n64": ("streamingllm", 64)}.items():
        cfg, _ = load_config(["configs/tiny.yml", f"configs/sepllm/{overlay}.yml"], **quiet)
        assert (cfg.attention.sepllm.mode, cfg.attention.sepllm.n_local) == (mode, n_local), overlay
    for variant in ("full", "sepllm", "streamingllm", "fixed_interval"):
        cfg, _ = load_config(["configs/experiments/base.yml", f"configs/experiments/{variant}.yml"], **quiet)
        assert cfg.attention.sepllm.mode == variant and cfg.model.seq_length == 1024, variant

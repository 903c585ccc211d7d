"""GPT-NeoX and SepLLM-reference configs load with their authors' meaning (megatron/config/neox_compat.py).

The YAML files under tests/data/neox_dialect/ are written for these tests in NeoX's and the SepLLM
fork's dialects (key names and value forms are the facts carried over). Together they use every key of
the compat table; each test checks what the keys do.
"""
import re
import textwrap
from pathlib import Path

import pytest
from conftest import TOKENIZER

from megatron.config import config_from_tree, config_to_tree, load_config
from megatron.config.neox_compat import BY_KEY, MAPPED, NOOP, RULES, UNSUPPORTED, markdown_table
from megatron.config.schema import mlp_sizes
from megatron.errors import ConfigError
from megatron.tokenizer import build_tokenizer
from megatron.training.summary import separator_lines

ROOT = Path(__file__).resolve().parents[1]
DIALECT = ROOT / "tests" / "data" / "neox_dialect"

# Every key used by GPT-NeoX's configs/ (yml and json) and the SepLLM reference's sample_configs/,
# '-' spelled '_' (collected from both repositories; the names are facts).
CORPUS_KEYS = """
activation attention_config attention_dropout attention_type autotuning autotuning_config BATCH_ADAPTIVE_INIT_POS
bf16 bias_gelu_fusion BiPE_seps checkpoint_activations checkpoint_factor checkpoint_num_layers
checkpoint_validation_with_forward_pass comet_experiment_name comet_others comet_project comet_tags comment
data_impl data_path data_types decay_lr_to deepspeed_extra_args deepspeed_slurm distributed_backend eval_interval
eval_iters extra_save_iters finetune fp16 fp32_allreduce generate_local_window_size generate_win_loc_size_list
global_num_gpus gmlp_attn_dim gpt_j_residual gradient_accumulation_steps gradient_clipping hidden_dropout
hidden_size hostfile init_method init_tok_max_idx intermediate_size keep_last_n_checkpoints launcher
layernorm_fusion load log_dir log_grad_norm log_interval lr_decay_iters lr_decay_style make_vocab_size_divisible_by
mamba_causal_conv_fusion mamba_inner_func_fusion mamba_selective_scan_fusion max_position_embeddings maximum_tokens
memory_profiling memory_profiling_path merge_file min_lr mlp_multiple_of model_parallel_size moe_num_experts
no_ssh_check no_weight_tying norm num_attention_heads num_kv_heads num_layers num_samples num_workers optimizer
output_layer_init_method output_layer_parallelism override_lr_scheduler PADDING_ID partition_activations
pipe_parallel_size pos_emb precision prefill_loc_win_size_list prefill_local_window_size PRINT_KV_RATIO
print_ratio_intervals profile profile_step_start profile_step_stop prompt_end RECOMPILE_SEP_ATTN_KERNEL recompute
rms_norm_epsilon rope_fusion rotary_emb_base rotary_pct sample_input_file sample_output_file save save_interval
scaled_masked_softmax_fusion scaled_upper_triang_masked_softmax_fusion separator_token_ids seq_length
sliding_window_width sparsity_config split steps_per_print streamingLLM synchronize_each_layer te_columnparallel
te_fp8_amax_compute_algo te_fp8_amax_history_len te_fp8_format te_fp8_margin te_fp8_mha te_fp8_wgrad
te_layernorm_mlp te_mha te_rowparallel temperature tensorboard_dir test_data_paths text_gen_type tokenizer_type
top_k top_p train_data_paths train_iters train_micro_batch_size_per_gpu use_bias_in_attn_linear use_bias_in_mlp
use_bias_in_norms USE_BiPE use_bnb_optimizer use_comet USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS
USE_ORIGINAL_FULL_ATTEN USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS USE_SEP_ATTN_KERNEL_ACCELERATOR use_wandb
valid_data_paths vocab_file wall_clock_breakdown wandb_group wandb_host wandb_project wandb_team warmup
warmup_iters weight_decay zero_optimization
""".split()

ACCEPTED = {"neox160": ["my_neox_160M.yml"], "llama": ["neox_llama_7B.yml", "neox_local_setup.yml"],
            "window": ["neox_mistral_window.yml"], "sepllm": ["sepllm_n64HT.yml"],
            "streaming": ["sepllm_streaming.yml"]}
REJECTED = ["neox_unsupported.yml", "sepllm_unsupported.yml"]


def load(name, log=None):
    logs = [] if log is None else log
    cfg, _ = load_config([str(DIALECT / f) for f in ACCEPTED[name]], log=logs.append)
    return cfg, logs


def dialect_keys(files):
    """Top-level keys of YAML files, '-' read as '_' (what the loader sees)."""
    import yaml
    keys = set()
    for f in files:
        keys |= {k.replace("-", "_") for k in yaml.safe_load((DIALECT / f).read_text())}
    return keys


def noop_line(logs):
    (line,) = [m for m in logs if m.startswith("config: accepted with no effect here")]
    return set(line.split(": ", 2)[2].split(", "))


def test_table_covers_every_corpus_key_and_the_doc_is_generated_from_it():
    assert sorted(set(CORPUS_KEYS) - set(BY_KEY)) == []
    assert {r.kind for r in RULES} == {MAPPED, NOOP, UNSUPPORTED}
    assert (ROOT / "docs" / "neox_compat.md").read_text() == markdown_table(), \
        "regenerate: python tools/neox_compat_table.py > docs/neox_compat.md"
    assert "docs/neox_compat.md" in (ROOT / "README.md").read_text()


def test_dialect_files_use_every_key_of_the_table():
    used = dialect_keys([f for files in ACCEPTED.values() for f in files] + REJECTED)
    assert sorted(set(BY_KEY) - used) == []


def test_neox_pythia_160M_keeps_neox_meaning():
    cfg, logs = load("neox160")
    m, tr, par = cfg.model, cfg.training, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (12, 768, 12, 2048)
    assert (m.rotary_pct, m.gpt_j_residual, m.no_weight_tying, m.pos_emb) == (0.25, True, True, "rotary")
    assert (m.init_method, m.output_layer_init_method) == ("small_init", "wang_init")
    assert m.activation == "gelu_tanh"  # bias_gelu_fusion: NeoX's fused GELU is the tanh approximation
    assert cfg.attention.sepllm.mode == "full"  # nothing about SepLLM: full causal attention, as NeoX trains
    assert (cfg.optimizer.type, cfg.optimizer.params.lr, tr.min_lr) == ("adam", 6e-4, 6e-5)
    assert (tr.precision, tr.fp16.enabled, tr.fp16.initial_scale_power, tr.fp16.loss_scale) == ("fp16", True, 12, 0)
    assert (tr.fp16.loss_scale_window, tr.fp16.hysteresis, tr.fp16.min_loss_scale) == (1000, 2, 1.0)
    assert (tr.clip_grad, tr.weight_decay, tr.lr_decay_style, tr.warmup) == (1.0, 0.1, "cosine", 0.01)
    z = par.zero_optimization
    assert (z.stage, z.allgather_bucket_size, z.overlap_comm, z.cpu_offload) == (1, 500000000, True, False)
    assert cfg.checkpoint.extra_save_iters == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert (cfg.checkpoint.checkpoint_factor, cfg.data.num_workers, par.distributed_backend) == (1000, 1, "nccl")
    assert m.checkpoint_activations and any("gelu_tanh" in line for line in logs)
    assert noop_line(logs) == {"checkpoint_num_layers", "data_impl", "output_layer_parallelism",
                               "partition_activations", "scaled_upper_triang_masked_softmax_fusion",
                               "steps_per_print", "synchronize_each_layer", "wall_clock_breakdown"}


def test_neox_llama_and_local_setup_keys_act():
    cfg, logs = load("llama")
    m, tr, d, ck, lg, la = cfg.model, cfg.training, cfg.data, cfg.checkpoint, cfg.logging, cfg.launch
    assert (m.norm, m.norm_epsilon, m.use_bias_in_norms, m.use_bias_in_attn_linear, m.use_bias_in_mlp) == \
        ("rmsnorm", 1e-6, False, False, False)
    assert (m.activation, m.intermediate_size, m.mlp_multiple_of) == ("swiglu", 32768, 256)
    assert mlp_sizes(m) == (22016, 11008)
    assert (m.fused_rope, m.fused_layernorm, m.num_kv_heads, m.make_vocab_size_divisible_by) == (False, False, 32, 1)
    assert tr.precision == "bf16" and not tr.fp16.enabled
    assert (tr.warmup_iters, tr.min_lr, tr.gradient_accumulation_steps, tr.train_batch_size) == \
        (2000, pytest.approx(3e-5), 8, 32)
    assert cfg.parallel.zero_optimization.load_from_fp32_weights is False
    assert (d.tokenizer_type, d.vocab_file, d.merge_file, d.num_workers) == ("SPMTokenizer", "tokenizer.model",
                                                                              "merges.txt", 2)
    assert (d.train_data_paths, d.test_data_paths, d.train_data_weights) == (["data/train_text_document"],
                                                                            ["data/test_text_document"], [1.0])
    assert (ck.save, ck.load, ck.checkpoint_factor, ck.extra_save_iters) == ("checkpoints/run", "checkpoints/run",
                                                                             250, [0, 1, 2, 4])
    assert (ck.keep_last_n_checkpoints, tr.seed, tr.exit_interval) == (3, 42, 5000)
    assert (lg.use_wandb, lg.wandb_project, lg.wandb_group, lg.wandb_entity, lg.wandb_host, lg.wandb_run_name) == \
        (True, "porting", "tests", "our-team", "https://api.wandb.ai", "llama-port")
    assert (lg.tensorboard_dir, lg.log_dir, lg.log_interval, lg.peak_theoretical_tflops) == ("tensorboard", "logs", 5,
                                                                                             312.0)
    assert (la.hostfile, la.launcher, la.num_gpus, la.global_num_gpus, la.master_addr, la.master_port) == \
        ("/etc/hostfile", "deepspeed", 8, 16, "10.1.1.1", 29600)
    assert (la.deepspeed_slurm, la.comment, la.account) == (False, "porting test", "porting-account")
    expected_noops = {k for k in dialect_keys(ACCEPTED["llama"]) if BY_KEY.get(k) and BY_KEY[k].kind == NOOP}
    assert noop_line(logs) == expected_noops | {"bias_gelu_fusion"}  # bias_gelu_fusion with swiglu: no effect
    assert "use_comet" in expected_noops and "te_mha" in expected_noops  # features that are off


def test_neox_sliding_window_bf16_through_fp16_and_inits():
    cfg, _ = load("window")
    sep = cfg.attention.sepllm
    # flash's window_size=(63, 0): keys i-63..i, i.e. 64 counting the query itself; no initial tokens
    assert (sep.mode, sep.n_init, sep.n_local) == ("streamingllm", 0, 64)
    assert cfg.training.precision == "bf16" and not cfg.training.fp16.enabled  # DeeperSpeed's fp16.type bfloat16
    assert (cfg.model.init_method, cfg.model.output_layer_init_method) == ("xavier_normal",
                                                                           "single_residual_scaled_normal")
    assert cfg.training.lr_decay_style == "linear" and mlp_sizes(cfg.model) == (256, 128)


def test_sepllm_reference_keys_map_onto_the_rule():
    cfg, logs = load("sepllm")
    sep = cfg.attention.sepllm
    assert sep.mode == "sepllm" and sep.n_init == 4  # init_tok_max_idx 3: positions 0..3
    assert sep.separator_ids == [15, 13, 32, 2, 28, 27, 209, 186, 187]
    # per-layer windows: 128 >= seq_length is full attention (the reference's hybrid H/T layers)
    assert (sep.full_attention_layers, sep.n_local, sep.layer_n_local) in [([0, 3], 64, {2: 32}),
                                                                           ([0, 3], 32, {1: 64})]
    assert cfg.logging.kv_ratio_interval == 10  # every 40 forward passes / 4 accumulation steps
    assert (cfg.model.bipe, cfg.model.bipe_separator_ids) == (False, [15, 13])
    assert cfg.training.precision == "fp16" and cfg.training.fp16.initial_scale_power == 10
    assert (cfg.training.fp16.loss_scale_window, cfg.training.fp16.hysteresis) == (500, 3)
    assert noop_line(logs) == {"_DEFAULT_SPARSE_BLOCK_SIZE", "BATCH_ADAPTIVE_INIT_POS", "EXCLUDE_DIAGONAL",
                               "generate_k", "generate_local_window_size", "generate_win_loc_size_list",
                               "PADDING_ID", "prefill_k",
                               "prefill_local_window_size", "RECOMPILE_SEP_ATTN_KERNEL", "SA_Denominator_Bias",
                               "SA_Numerator_Bias", "scaled_masked_softmax_fusion",
                               "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO"}
    streaming, logs = load("streaming")
    sep = streaming.attention.sepllm
    assert (sep.mode, sep.n_init, sep.n_local) == ("streamingllm", 3, 64)
    assert noop_line(logs) == {"PRINT_KV_RATIO", "print_ratio_intervals"}
    assert streaming.logging.kv_ratio_interval is None


def test_separator_ids_that_are_not_separators_in_this_tokenizer_are_flagged():
    """SepLLM's configs list GPT-NeoX-20B's ids (209 ' ', 186 '\\t', 187 '\\n'); with another tokenizer
    those ids are other tokens, which the start-up log says in one warning line."""
    cfg, _ = load("sepllm")
    cfg.data.vocab_file = str(TOKENIZER)
    ids = cfg.attention.sepllm.separator_ids
    ours = build_tokenizer("HFTokenizer", str(TOKENIZER), None).token_texts()
    lines = separator_lines(cfg, ids, ours)
    assert lines[0].startswith("separators (9 ids): 2 '!', 13 ',', 15 '.'")
    warning = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith("warning: separators 186, 187, 209 are not punctuation")
    assert str(TOKENIZER) in warning[0] and "separator_tokens" in warning[0]
    neox_20b = {15: ".", 13: ",", 32: "?", 2: "!", 28: ";", 27: ":", 209: " ", 186: "\t", 187: "\n"}
    assert not [ln for ln in separator_lines(cfg, ids, neox_20b) if ln.startswith("warning:")]
    cfg.attention.sepllm.separator_ids = None  # chosen by text: whatever the tokenizer made of them
    assert not [ln for ln in separator_lines(cfg, [5, 6], ours) if ln.startswith("warning:")]


def test_unsupported_features_of_every_file_in_one_report():
    files = [str(DIALECT / f) for f in REJECTED]
    with pytest.raises(ConfigError) as e:
        load_config(files, log=lambda m: None)
    lines = str(e.value).splitlines()
    problems = [ln.strip() for ln in lines[1:]]
    assert lines[0] == f"{len(problems)} problems in the config:"
    for text, f in zip(problems, [0] * 22 + [1] * 7):
        assert re.match(rf"{re.escape(files[f])}:\d+: ", text), text
    unsupported = dialect_keys(REJECTED) - {"num_layers", "hidden_size", "num_attention_heads", "bogus_key",
                                            "num_layer"}
    for key in unsupported - {"optimizer", "attention_config"}:
        assert any(f"'{key}'" in p for p in problems), key
    assert any("'optimizer.type' = 'Lion' is not supported" in p for p in problems)
    assert any("attention_config type 'local' is not supported" in p for p in problems)
    assert any(p.endswith("unknown key 'bogus_key'") for p in problems)  # no hint beats a wrong one
    assert any("unknown key 'num_layer'; did you mean 'num_layers'?" in p for p in problems)
    # a wrong type names only the file that set the key
    (bad_type,) = [p for p in problems if "'hidden_size'" in p]
    assert bad_type.startswith(f"{files[1]}:9: key 'hidden_size' = 'sixty-four'") and files[0] not in bad_type


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


@pytest.mark.parametrize("key, hint", [
    ("rope_fusionn", "rope_fusion"), ("save_intervall", "save_interval"), ("precison", "precision"),
    ("lr", "optimizer.params.lr"), ("n_local", "attention.sepllm.n_local"), ("zero_stage", "zero_optimization.stage"),
    ("num_key_value_heads", "num_kv_heads"), ("use_bipe", "USE_BiPE"), ("peak_flops", "peak_theoretical_tflops"),
    ("completely_unrelated", None), ("data_impls", "data_impl"), ("checkpoint_layers", "checkpoint_num_layers"),
    ("save_every", None), ("zz", None),
])
def test_hints_only_where_likely_right(tmp_path, key, hint):
    a = write(tmp_path, "a.yml", f"num_layers: 2\n{key}: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config([a], log=lambda m: None)
    message = str(e.value)
    assert message.startswith(f"{a}:2: unknown key '{key}'")
    assert message.endswith(f"; did you mean '{hint}'?" if hint else f"'{key}'")


def test_same_target_from_two_spellings(tmp_path):
    both = write(tmp_path, "both.yml", "clip_grad: 0.5\ngradient_clipping: 2.0\n")
    with pytest.raises(ConfigError, match=r"both.yml:2: 'gradient_clipping' and 'clip_grad' both set 'clip_grad'"):
        load_config([both], log=lambda m: None)
    later = write(tmp_path, "later.yml", "gradient_clipping: 2.0\n")
    logs = []
    cfg, _ = load_config([write(tmp_path, "a.yml", "clip_grad: 0.5\n"), later], log=logs.append)
    assert cfg.training.clip_grad == 2.0 and any("overrides 0.5" in m and "later.yml" in m for m in logs)


def test_precision_as_neox_derives_it(tmp_path):
    fp16 = write(tmp_path, "fp16.yml", '{"fp16": {"enabled": true, "loss_scale": 128}}\n')
    cfg, _ = load_config([fp16], log=lambda m: None)
    assert (cfg.training.precision, cfg.training.fp16.loss_scale) == ("fp16", 128.0)
    clash = write(tmp_path, "clash.yml", '{"precision": "bfloat16", "fp16": {"enabled": true}}\n')
    with pytest.raises(ConfigError, match="precision conflict: 'precision' says bf16, 'fp16' says fp16"):
        load_config([clash], log=lambda m: None)
    logs = []
    cfg, _ = load_config([fp16, write(tmp_path, "cpu.yml", "precision: fp32\n")], log=logs.append)
    assert cfg.training.precision == "fp32" and not cfg.training.fp16.enabled
    assert any("precision = 'fp32'" in m and "overrides 'fp16'" in m for m in logs)
    with pytest.raises(ConfigError, match="config: precision conflict: 'precision' says bf16"):
        config_from_tree({"precision": "bf16", "fp16": {"enabled": True}, "num_layers": 2}, log=lambda m: None)


def test_sepllm_and_attention_config_consistency_errors(tmp_path):
    flags = write(tmp_path, "flags.yml", "{'USE_ORIGINAL_FULL_ATTEN': True, 'streamingLLM': True}\n")
    with pytest.raises(ConfigError, match="USE_ORIGINAL_FULL_ATTEN and streamingLLM are all true; the reference"):
        load_config([flags], log=lambda m: None)
    windows = write(tmp_path, "w.yml", "{'num_layers': 3, 'USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS': True, "
                                       "'prefill_loc_win_size_list': [64, 64]}\n")
    with pytest.raises(ConfigError, match=r"w.yml:1: prefill_loc_win_size_list has 2 windows but num_layers is 3"):
        load_config([windows], log=lambda m: None)
    layers = write(tmp_path, "l.yml", 'num_layers: 4\nattention_config: [[["flash"], 3]]\n')
    with pytest.raises(ConfigError, match="attention_config covers 3 layers but num_layers is 4"):
        load_config([layers], log=lambda m: None)
    mixed = write(tmp_path, "m.yml", "{'sliding_window_width': 8, 'streamingLLM': True}\n")
    with pytest.raises(ConfigError, match="sliding_window_width and the SepLLM keys both set the attention rule"):
        load_config([mixed], log=lambda m: None)
    # an explicit mode from a later file wins over the SepLLM flags of an earlier one
    overlay = write(tmp_path, "o.yml", "attention: {sepllm: {mode: full}}\n")
    cfg, _ = load_config([str(DIALECT / "sepllm_streaming.yml"), overlay], log=lambda m: None)
    assert cfg.attention.sepllm.mode == "full"


def test_neox_mlp_rule_and_its_failure_case(tmp_path):
    """NeoX's gated MLP: int(2/3 x intermediate_size) over both branches, rounded to mlp_multiple_of; a
    size NeoX itself cannot build (Mistral's 14336 with multiple 1) is an error naming the way out."""
    cfg = config_from_tree({"hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu",
                            "intermediate_size": 32768, "mlp_multiple_of": 256}, log=lambda m: None)
    assert mlp_sizes(cfg.model) == (22016, 11008)
    with pytest.raises(ConfigError, match="input projection of 9558 but branches of 4778.*ffn_hidden_size"):
        config_from_tree({"hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu",
                          "intermediate_size": 14336}, log=lambda m: None)
    literal = config_from_tree({"hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu",
                                "ffn_hidden_size": 14336}, log=lambda m: None)
    assert mlp_sizes(literal.model) == (28672, 14336)
    assert mlp_sizes(config_from_tree({"hidden_size": 96, "num_attention_heads": 4}).model) == (384, 384)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_translated_configs_round_trip(name):
    cfg, _ = load(name)
    assert config_from_tree(config_to_tree(cfg), log=lambda m: None) == cfg


def test_alibi_bipe_and_fp16_of_sepllm_configs_launch():
    """SepLLM's sample configs train in fp16 with ALiBi / BiPE variants: all of it is implemented."""
    from megatron.config import validate_launch
    from megatron.model import build_model

    cfg, _ = load("sepllm")  # fp16, as every SepLLM sample config
    assert cfg.training.precision == "fp16" and cfg.training.fp16.enabled
    validate_launch(cfg, 1)
    for extra in ({"pos_emb": "alibi"}, {"bipe": True, "attention": {"sepllm": {"separator_ids": [5]}}}):
        cfg = config_from_tree({"num_layers": 2, **extra}, log=lambda m: None)
        validate_launch(cfg, 1)
        model = build_model(cfg, 64, device="meta")
        assert (model.alibi_slopes is not None) == (cfg.model.pos_emb == "alibi") and model.bipe == cfg.model.bipe


def test_misspelled_zero_stage_is_an_error_not_silently_no_zero(tmp_path):
    bad = write(tmp_path, "z.yml", '{"zero_optimization": {"stag": 2, "overlap_comm": true}}\n')
    with pytest.raises(ConfigError, match=r"z.yml:1: unknown key 'zero_optimization.stag'; did you mean 'stage'\?"):
        load_config([bad], log=lambda m: None)

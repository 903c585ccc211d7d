"""GPT-NeoX and SepLLM-reference configs, read with their authors' meaning.

Every key used in GPT-NeoX's ``configs/`` and in the SepLLM reference's ``sample_configs/`` (a NeoX
fork) is in :data:`RULES`, handled one of three ways:

* **mapped** onto our schema with NeoX's (or the reference's) meaning, renamed or translated where
  the spelling or the value form differs;
* **no-op**: accepted, listed once in one info line (a hint that means nothing here);
* **unsupported**: reported, with every other problem of the config, in one error.

Keys of our own schema that NeoX does not use pass through unchanged; an unknown key is reported by
the schema check. The table in docs/neox_compat.md is generated from :data:`RULES`
(``python tools/neox_compat_table.py > docs/neox_compat.md``; a test keeps them equal). Rules that
need several keys (precision, the SepLLM attention rule, ...) are in ``compat_groups.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.config.compat_context import Context
from megatron.config.problems import Problems

MAPPED, NOOP, UNSUPPORTED = "mapped", "no-op", "unsupported"
NEOX, SEPLLM, RUNNER, DS, LLEMMA = "NeoX", "SepLLM", "NeoX launcher", "NeoX (DeepSpeed)", "Llemma fork"

Apply = Callable[[Context, str, Any], None]


@dataclass(frozen=True)
class Rule:
    key: str  # the spelling with '_' (either spelling is accepted), case as the source writes it
    kind: str  # MAPPED, NOOP or UNSUPPORTED
    dialect: str
    target: str  # our key(s), for the table
    note: str
    apply: Optional[Apply] = None  # None: a group rule in compat_groups reads the key


def _same(ctx: Context, key: str, value: Any) -> None:
    ctx.assign(key, value, key)


def same(key: str, note: str = "", dialect: str = NEOX) -> Rule:
    return Rule(key, MAPPED, dialect, key, note or "same key, same meaning", _same)


def rename(key: str, target: str, note: str = "", dialect: str = NEOX) -> Rule:
    return Rule(key, MAPPED, dialect, target, note or "same meaning",
                lambda ctx, k, v: ctx.assign(target, v, k))


def group(key: str, target: str, note: str, dialect: str = NEOX) -> Rule:
    return Rule(key, MAPPED, dialect, target, note, None)


def noop(key: str, note: str, dialect: str = NEOX) -> Rule:
    return Rule(key, NOOP, dialect, "-", note, lambda ctx, k, v: ctx.noop(k))


def unsupported(key: str, note: str, dialect: str = NEOX) -> Rule:
    return Rule(key, UNSUPPORTED, dialect, "-", note,
                lambda ctx, k, v: ctx.problem(k, f"unsupported key '{k}': {note}"))


def noop_unless(key: str, accepted: Callable[[Any], bool], when_accepted: str, otherwise: str,
                dialect: str = NEOX) -> Rule:
    """A no-op for accepted values (e.g. a feature flag that is off), unsupported otherwise."""
    def apply(ctx: Context, k: str, v: Any) -> None:
        if accepted(v):
            ctx.noop(k)
        else:
            ctx.problem(k, f"key '{k}' = {v!r} is not supported: {otherwise}")
    return Rule(key, NOOP, dialect, "-", f"{when_accepted}; otherwise unsupported: {otherwise}", apply)


def choices(key: str, passed: Dict[Any, Any], refused: Dict[Any, str], note: str, target: str = "",
            dialect: str = NEOX) -> Rule:
    """A mapped key whose values translate through ``passed``; values in ``refused`` are unsupported
    (with the reason); other values go to the schema check (which names the valid ones)."""
    target = target or key

    def apply(ctx: Context, k: str, v: Any) -> None:
        if isinstance(v, str) and v in refused:
            ctx.problem(k, f"key '{k}' = {v!r} is not supported: {refused[v]}")
        else:
            ctx.assign(target, passed.get(v, v) if isinstance(v, (str, int, float, bool)) else v, k)
    return Rule(key, MAPPED, dialect, target, note, apply)


def _false(v: Any) -> bool:
    return v in (False, None, 0)


def _optimizer(ctx: Context, key: str, value: Any) -> None:
    """NeoX's ``optimizer: {type, params}``; 'Adam' (any case) is decoupled-weight-decay Adam."""
    if not isinstance(value, dict):
        ctx.assign(key, value, key)
        return
    refused = {"onebitadam": "1-bit Adam (DeepSpeed compressed communication)", "sm3": "SM3",
               "madgrad_wd": "MADGRAD", "sgd": "SGD (NeoX uses it for muP only)", "lion": "Lion",
               "cpu_adam": "DeepSpeed CPU Adam (optimizer offload)",
               "cpu_torch_adam": "torch Adam on CPU (optimizer offload)"}
    for sub, v in value.items():
        dotted = f"optimizer.{sub}"
        if sub == "type" and isinstance(v, str):
            if v.lower() in refused:
                ctx.problem(dotted, f"key 'optimizer.type' = {v!r} is not supported: {refused[v.lower()]}; "
                                    "use 'adam' or 'adamw'")
            else:
                ctx.assign(dotted, v.lower(), dotted)
        elif sub == "params" and isinstance(v, dict):
            for name, pv in v.items():
                ctx.assign(f"optimizer.params.{name}", pv, f"optimizer.params.{name}")
        else:
            ctx.assign(dotted, v, dotted)


def _pipe_parallel_size(ctx: Context, key: str, value: Any) -> None:
    """NeoX's 0 means no pipeline engine: one stage, as 1 does."""
    if value == 0 and type(value) is int:
        ctx.log("config: pipe_parallel_size = 0 read as 1 (no pipeline split)")
        value = 1
    ctx.assign(key, value, key)


def _attention_section(ctx: Context, key: str, value: Any) -> None:
    """Our ``attention:`` section, one assignment per leaf so SepLLM keys can override leaves."""
    if not isinstance(value, dict):
        ctx.assign(key, value, key)
        return
    for sub, v in value.items():
        if sub == "sepllm" and isinstance(v, dict):
            for name, sv in v.items():
                ctx.assign(f"attention.sepllm.{name}", sv, f"attention.sepllm.{name}")
        else:
            ctx.assign(f"attention.{sub}", v, f"attention.{sub}")


TE = "Transformer Engine (NVIDIA's fp8 layers)"
SPARSE = "NeoX's sparse attention (DeepSpeed block-sparse kernels)"
GEN = "generate.py's setting, NeoX's meaning (README: Coming from GPT-NeoX); training ignores it"

RULES: List[Rule] = [
    # ---------------------------------------------------------------- model shape
    same("num_layers"), same("hidden_size"), same("num_attention_heads"),
    same("num_kv_heads", "grouped-query attention: key/value heads"),
    noop("attention_type", "'groupedquery' is implied by num_kv_heads < num_attention_heads", LLEMMA),
    same("seq_length"), same("max_position_embeddings"),
    same("make_vocab_size_divisible_by", "vocabulary padded to a multiple of this x model_parallel_size"),
    same("intermediate_size", "NeoX's meaning: gated MLPs (swiglu) take 2/3 of it over both branches, "
                              "rounded up to mlp_multiple_of (ffn_hidden_size is the literal width)"),
    same("mlp_multiple_of", "rounding of the MLP width (NeoX's rule, see intermediate_size)"),
    choices("activation", {}, {a: "this activation is not implemented (gelu, relu, swiglu are)"
                               for a in ("silu", "geglu", "reglu", "softsign", "swish", "mish", "bilinear", "glu")},
            "gelu, relu, swiglu (gated, NeoX's 2/3 sizing); gelu becomes gelu_tanh with bias_gelu_fusion"),
    choices("norm", {}, {"scalenorm": "ScaleNorm is not implemented",
                         "non_parametric_layernorm": "non-parametric LayerNorm is not implemented",
                         "te_rmsnorm": TE, "te_layernorm": TE}, "layernorm or rmsnorm"),
    same("layernorm_epsilon"), same("rms_norm_epsilon", "epsilon of rmsnorm (NeoX default 1e-8; ours: "
                                                        "layernorm_epsilon when unset)"),
    same("use_bias_in_norms", "layernorm bias on/off (NeoX declares it but never reads it; rmsnorm has "
                              "no bias in either)"),
    same("use_bias_in_attn_linear"), same("use_bias_in_mlp"),
    choices("pos_emb", {}, {"sinusoidal": "sinusoidal position embeddings are not implemented",
                            "rpe": "T5 relative position buckets are not implemented"},
            "rotary, learned, none, alibi (NeoX's default is learned; ours rotary)"),
    same("rotary_pct"), same("rotary_emb_base"), same("no_weight_tying"),
    same("gpt_j_residual", "parallel attention + MLP residual with two norms (Pythia)"),
    same("init_method", "normal, scaled_normal, orthogonal, scaled_orthogonal, xavier_uniform, "
                        "xavier_normal, wang_init, small_init, single_residual_scaled_normal (NeoX's formulas)"),
    same("output_layer_init_method", "the same choices, for the attention and MLP output projections"),
    same("init_method_std"), same("hidden_dropout"),
    same("attention_dropout", "dropout on attention probabilities (reference/sdpa/flash impls and full "
                              "layers; rejected before launch for the compact and flex kernels)"),
    group("attention_config", "- (checked)",
          "global/flash layers are dense causal attention; the list must cover num_layers; "
          "other types are unsupported"),
    group("sliding_window_width", "attention.sepllm",
          "sliding window of W: streamingllm mode with n_init 0, n_local W + 1 (full when W + 1 >= seq_length)"),
    noop_unless("sparsity_config", lambda v: not v, "empty: no sparse attention", SPARSE),
    noop_unless("output_layer_parallelism", lambda v: v == "column", "'column' is our vocabulary-parallel head",
                "a head split over the hidden dimension (NeoX itself refuses it)"),
    noop("scaled_upper_triang_masked_softmax_fusion", "a fused softmax kernel; the math is the same"),
    noop("scaled_masked_softmax_fusion", "a fused softmax kernel; the math is the same", SEPLLM),
    group("bias_gelu_fusion", "activation", "NeoX's fused bias-GELU is the tanh approximation: with gelu "
                                            "it means activation gelu_tanh; no effect otherwise"),
    noop("bias_dropout_fusion", "a fused kernel; the math is the same"),
    rename("rope_fusion", "fused_rope", "fused rotary kernel (Triton) on/off"),
    rename("layernorm_fusion", "fused_layernorm", "fused norm kernel (Triton) on/off"),
    rename("rmsnorm_fusion", "fused_layernorm", "fused norm kernel (Triton) on/off"),
    noop("gmlp_attn_dim", "a gMLP setting (gMLP itself is unsupported)"),
    *[noop(k, "a Mamba kernel setting (Mamba itself is unsupported)")
      for k in ("mamba_selective_scan_fusion", "mamba_causal_conv_fusion", "mamba_inner_func_fusion")],
    noop_unless("moe_num_experts", lambda v: v in (None, 0, 1), "1: no mixture of experts",
                "mixture of experts (MoE) is not implemented"),
    *[noop_unless(k, _false, "false: " + TE + " off", TE)
      for k in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_mha")],
    *[noop(k, "an fp8 setting of " + TE + ", which is off")
      for k in ("te_fp8_format", "te_fp8_wgrad", "te_fp8_amax_history_len", "te_fp8_amax_compute_algo",
                "te_fp8_margin")],
    # ---------------------------------------------------------------- precision, optimizer, schedule
    group("precision", "precision", "fp32, bfloat16 (bf16), fp16; checked against the fp16/bf16 sections"),
    group("fp16", "precision, fp16", "enabled: precision fp16 with its loss-scale settings; "
                                     "type bfloat16 (DeeperSpeed): precision bf16. Under ZeRO (stage 1-2) "
                                     "DeepSpeed scales the loss and runs fp16 only on CUDA or a CPU with "
                                     "AVX512-FP16/AMX-FP16: elsewhere the ranks refuse it in one line, a dry run "
                                     "warns (stage 0 runs fp16 on any device with our loss scaler)", DS),
    group("bf16", "precision", "enabled: precision bf16 (loss-scale keys in it have no effect)", DS),
    noop("fp32_allreduce", "gradients are fp32 (master weights) and reduced in fp32 already", DS),
    noop_unless("data_types", lambda v: not v or v == {"grad_accum_dtype": "fp32"},
                "grad_accum_dtype fp32: gradients accumulate in fp32 already",
                "only fp32 gradient accumulation is implemented", DS),
    Rule("optimizer", MAPPED, NEOX, "optimizer", "type Adam/adam/AdamW (decoupled weight decay, as NeoX); "
                                                 "params lr, betas, eps", _optimizer),
    noop_unless("use_bnb_optimizer", _false, "false: torch AdamW", "bitsandbytes optimizers are not supported"),
    same("zero_optimization", "typed: stage 0-2 and DeepSpeed's keys; unknown keys are errors", DS),
    same("train_micro_batch_size_per_gpu", dialect=DS), same("gradient_accumulation_steps", dialect=DS),
    rename("gas", "gradient_accumulation_steps", dialect=DS),
    same("train_batch_size", "checked against micro x accumulation x data-parallel size", DS),
    rename("gradient_clipping", "clip_grad", "global-norm clipping (NeoX copies it into clip_grad)", DS),
    same("clip_grad"), same("weight_decay", "NeoX default 0.1; ours 0.01"),
    same("train_iters"), same("seed"),
    choices("lr_decay_style", {}, {"exponential": "exponential decay is not implemented"},
            "cosine, linear, constant (NeoX's default is linear; ours cosine)"),
    same("lr_decay_iters"), same("warmup", "fraction of lr_decay_iters"), same("min_lr"),
    same("warmup_iters", "absolute warmup iterations (wins over warmup)", LLEMMA),
    group("decay_lr_to", "min_lr", "min_lr = decay_lr_to x optimizer lr", LLEMMA),
    noop("override_lr_scheduler", "the schedule is always computed from the config, never restored"),
    same("eval_interval"), same("eval_iters", "batches per validation run and for the final test run"),
    same("exit_interval"),
    # ---------------------------------------------------------------- data
    same("data_path"), same("train_data_paths"), same("valid_data_paths"),
    same("test_data_paths", "evaluated at the end of training, like NeoX"),
    same("train_data_weights"), same("split"), same("vocab_file"), same("merge_file"),
    choices("tokenizer_type", {}, {"TiktokenTokenizer": "this tokenizer type is not implemented"},
            "HFTokenizer, SPMTokenizer, GPT2BPETokenizer, HFGPT2Tokenizer (local GPT-2 files, NeoX's "
            "<|padding|> added), CharLevelTokenizer (UTF-8 bytes, vocabulary 512, eod 0, as NeoX)"),
    same("num_workers", "background DataLoader workers preparing batches"),
    noop_unless("data_impl", lambda v: v in ("mmap", "infer"), "mmap/infer: our datasets are mmap",
                "only mmap indexed datasets are implemented"),
    # ---------------------------------------------------------------- parallelism and activations
    Rule("pipe_parallel_size", MAPPED, NEOX, "pipe_parallel_size", "0 (NeoX: no pipeline engine) reads as 1",
         _pipe_parallel_size),
    same("model_parallel_size"),
    same("sequence_parallel"), same("distributed_backend", "nccl falls back to gloo with a message on "
                                                           "a machine without CUDA"),
    same("checkpoint_activations"),
    noop("checkpoint_num_layers", "we recompute per layer (NeoX's 1); other values only trade memory"),
    noop("partition_activations", "a memory layout hint for checkpointed activations"),
    noop("synchronize_each_layer", "a CUDA synchronize hint for checkpointed activations"),
    # ---------------------------------------------------------------- checkpoints
    same("save"), same("load", "missing or empty: start from scratch (save == load auto-resume), "
                               "an error with finetune"),
    same("finetune"), same("keep_last_n_checkpoints"),
    same("checkpoint_factor", "save every N iterations (NeoX's linear checkpoint_scale)"),
    rename("save_interval", "checkpoint_factor", "older NeoX name"),
    same("extra_save_iters", "also save at these iterations (0: before the first step)"),
    same("checkpoint_validation_with_forward_pass", "the loss of a fixed batch (NeoX: its logits) is saved with "
                                                    "each checkpoint and must come out again after loading"),
    same("checkpoint_scale", "linear: every checkpoint_factor iterations; log: at 1 and every power of "
                             "checkpoint_factor (an integer here)"),
    same("iteration", "the step to load: load's global_stepN instead of the one 'latest' names"),
    noop_unless("s3_path", lambda v: v in (None, ""), "null: no upload",
                "uploading checkpoints to S3 is not implemented; copy the save directory with your own tool"),
    noop("s3_chunk_size", "a setting of the S3 upload (s3_path), which is not implemented"),
    # ---------------------------------------------------------------- logging
    same("log_interval"), same("log_dir"), same("tensorboard_dir", "needs the tensorboard extra"),
    same("use_wandb"), same("wandb_project"), same("wandb_group"),
    rename("wandb_team", "wandb_entity"), same("wandb_host"), same("wandb_run_name"),
    same("peak_theoretical_tflops", "per-device peak for MFU in the training log"),
    same("log_param_norm", "parameter_norms/NAME and the total param_norm at each log_interval, whole "
                           "parameters under any layout"),
    same("log_grad_norm", "gradient_norms/NAME (before clipping) at each log_interval; the total grad_norm "
                          "is always logged; not under ZeRO"),
    same("log_grad_pct_zeros", "pct_grad_zeros/NAME at each log_interval; not under ZeRO"),
    same("log_optimizer_states", "optimizer_state_norms/NAME_exp_avg and _exp_avg_sq at each log_interval"),
    same("log_gradient_noise_scale", "noise_scale (NeoX's estimate) in the log line and train/noise_scale; "
                                     "not under ZeRO, as in NeoX"),
    same("gradient_noise_scale_n_batches", "global batches averaged into the noise scale's large batch"),
    same("gradient_noise_scale_cpu_offload", "the noise scale's gradient buffer in CPU memory"),
    noop("steps_per_print", "DeepSpeed's own print interval; the log follows log_interval", DS),
    noop("wall_clock_breakdown", "DeepSpeed timers; the log shows ms/iter, tokens/s and FLOPs/s", DS),
    noop_unless("use_comet", _false, "false: no Comet", "Comet logging is not implemented (wandb, "
                                                        "tensorboard and the JSONL log are)"),
    *[noop(k, "a Comet setting (Comet logging is not implemented)")
      for k in ("comet_project", "comet_experiment_name", "comet_tags", "comet_others", "comet_workspace")],
    same("profile", "torch.profiler traces of iterations profile_step_start + 1 .. profile_step_stop into "
                    "tensorboard_dir (else log_dir), NVTX ranges on CUDA"),
    same("profile_step_start", "the profiler's warm-up iteration (the next one is the first recorded)"),
    same("profile_step_stop", "the last profiled iteration"),
    same("memory_profiling", "CUDA memory snapshot (peak RSS without CUDA) after profile_step_stop"),
    same("memory_profiling_path", "directory of memory_profiling's mem_snapshot.pickle / peak_rss.json"),
    *[same(k, GEN) for k in ("text_gen_type", "temperature", "top_p", "top_k", "maximum_tokens", "prompt_end",
                             "sample_input_file", "sample_output_file", "num_samples", "recompute")],
    noop("eval_results_prefix", "an evaluation setting of NeoX's eval.py; eval.py takes --output-path"),
    same("eval_tasks", "lm-eval tasks run at every eval_interval through our harness (megatron/evaluation); "
                       "results in the log line, metrics.jsonl, tensorboard and wandb (validation/TASK_METRIC)"),
    # ---------------------------------------------------------------- launcher (deepy.py)
    same("hostfile", "DeepSpeed-format hostfile for deepy.py; a path that does not exist (NeoX's /mock_path) "
                     "runs on this node with one warning, as DeepSpeed does", RUNNER),
    choices("launcher", {"pdsh": "deepspeed"},
            {v: "MPI launchers are not supported; use launcher: slurm, pdsh or torchrun"
             for v in ("openmpi", "mvapich")},
            "pdsh: the DeepSpeed launcher (it runs pdsh); slurm: srun inside the allocation, one task per "
            "rank; ours: torchrun, deepspeed, slurm", dialect=RUNNER),
    same("num_gpus", "processes per node for deepy.py", RUNNER),
    same("global_num_gpus", "the world size, checked by deepy.py", RUNNER),
    same("master_addr", dialect=RUNNER), same("master_port", dialect=RUNNER),
    same("deepspeed_slurm", "true: a task of an srun step takes RANK / LOCAL_RANK / WORLD_SIZE from "
                            "SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, MASTER_ADDR from the first node "
                            "of the step, MASTER_PORT from the job id (unless set)", RUNNER),
    noop("no_ssh_check", "deepy.py does no ssh check", RUNNER),
    same("comment", "srun --comment (launcher slurm)", RUNNER),
    same("account", "srun --account (launcher slurm)", RUNNER),
    same("include", "DeepSpeed's host selection, 'node-a@node-b:0,2': only these hosts (slots after ':')",
         RUNNER),
    same("exclude", "DeepSpeed's host selection: skip these hosts (or slots)", RUNNER),
    same("num_nodes", "the first N hosts of the hostfile (after include/exclude); -1: all", RUNNER),
    noop("deepspeed_extra_args", "extra DeepSpeed engine settings (comms logger, ...) are not forwarded", DS),
    unsupported("autotuning", "DeepSpeed autotuning is not supported", DS),
    unsupported("autotuning_config", "DeepSpeed autotuning is not supported", DS),
    # ---------------------------------------------------------------- SepLLM reference
    group("separator_token_ids", "attention.sepllm.separator_ids",
          "separator ids of this tokenizer ([-1]: none); the start-up log prints their tokens", SEPLLM),
    group("init_tok_max_idx", "attention.sepllm.n_init", "n_init = init_tok_max_idx + 1", SEPLLM),
    group("prefill_local_window_size", "attention.sepllm.n_local",
          "the window counting the query itself (reference default 256)", SEPLLM),
    group("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "attention.sepllm",
          "true: the per-layer list decides each layer's window", SEPLLM),
    group("prefill_loc_win_size_list", "attention.sepllm.full_attention_layers, n_local, layer_n_local",
          "per-layer windows; a window >= seq_length is a full-attention layer (hybrid H/HT/HMT)", SEPLLM),
    group("USE_ORIGINAL_FULL_ATTEN", "attention.sepllm.mode", "true: mode full", SEPLLM),
    group("streamingLLM", "attention.sepllm.mode", "true: mode streamingllm (initial + local only)", SEPLLM),
    group("USE_SEP_ATTN_KERNEL_ACCELERATOR", "attention.sepllm.mode",
          "true: mode sepllm through a kernel (attention.impl auto picks ours); false with the other two "
          "flags false: sepllm too; at most one of the three may be true", SEPLLM),
    noop("RECOMPILE_SEP_ATTN_KERNEL", "a torch.compile switch of the reference's FlexAttention path", SEPLLM),
    *[noop(k, "generation-time windows; the reference says they have no effect in training "
              "(streaming generation takes its cache sizes as flags)", SEPLLM)
      for k in ("generate_local_window_size", "generate_win_loc_size_list",
                "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS")],
    noop("PADDING_ID", "read only for BATCH_ADAPTIVE_INIT_POS (left-padded evaluation batches)", SEPLLM),
    noop_unless("BATCH_ADAPTIVE_INIT_POS", _false, "false: initial tokens are positions 0..n_init-1",
                "initial tokens after left padding (evaluation batches) are not implemented", SEPLLM),
    group("PRINT_KV_RATIO", "kv_ratio_interval", "true: log the kept-KV fraction of Sep-Attention", SEPLLM),
    group("print_ratio_intervals", "kv_ratio_interval",
          "forward passes between kept-KV logs (/ gradient_accumulation_steps = iterations)", SEPLLM),
    rename("USE_BiPE", "bipe", "bilevel positional encoding", SEPLLM),
    rename("BiPE_seps", "bipe_separator_ids", "BiPE's segment-ending token ids", SEPLLM),
    noop("prefill_k", "deprecated and unimplemented in the reference", SEPLLM),
    noop("generate_k", "deprecated and unimplemented in the reference", SEPLLM),
    noop_unless("EXCLUDE_DIAGONAL", lambda v: v in (True, None), "true: the window counts the query itself",
                "a window that excludes the query is not implemented", SEPLLM),
    noop("_DEFAULT_SPARSE_BLOCK_SIZE", "the reference's FlexAttention block size", SEPLLM),
    noop_unless("USE_SA_SOFTMAX", _false, "false", "self-adjusting softmax is not implemented", SEPLLM),
    noop_unless("USE_SA_SOFTMAX_NO_DENO", _false, "false", "self-adjusting softmax is not implemented", SEPLLM),
    noop("SA_Numerator_Bias", "a self-adjusting-softmax setting (not implemented)", SEPLLM),
    noop("SA_Denominator_Bias", "a self-adjusting-softmax setting (not implemented)", SEPLLM),
]

# Our own nested sections go through the translator too (so SepLLM keys can override their leaves).
SECTION_APPLY: Dict[str, Apply] = {"attention": _attention_section}

BY_KEY: Dict[str, Rule] = {r.key: r for r in RULES}
assert len(BY_KEY) == len(RULES), "a key is listed twice in RULES"


def translate(tree: Dict[str, Any], source: Dict[str, str], lines: Dict[Tuple[str, str], int],
              files: List[str], problems: Problems, log: Callable[[str], None]) -> Context:
    """Apply every rule to the merged tree; returns the context holding our tree and the no-ops."""
    from megatron.config.compat_groups import apply_groups

    ctx = Context(tree, source, lines, files, problems, log)
    for key, value in tree.items():
        rule = BY_KEY.get(key)
        if key in SECTION_APPLY:
            SECTION_APPLY[key](ctx, key, value)
        elif rule is None:
            ctx.assign(key, value, key)  # ours, or unknown: the schema check reports unknown keys
        elif rule.apply is not None:
            rule.apply(ctx, key, value)
    apply_groups(ctx)
    if ctx.noops:
        log("config: accepted with no effect here (docs/neox_compat.md says why): "
            + ", ".join(sorted(set(ctx.noops), key=str.lower)))
    return ctx


# Keys whose NeoX default differs from ours: a NeoX config that leaves them out means NeoX's value.
DEFAULT_DIFFERENCES = [
    ("pos_emb", "learned", "rotary"), ("lr_decay_style", "linear", "cosine"), ("weight_decay", "0.1", "0.01"),
    ("rms_norm_epsilon", "1e-8", "layernorm_epsilon (1e-5)"), ("num_workers", "2", "0"),
    ("eval_iters", "100", "10"), ("eval_interval", "1000", "100"), ("log_interval", "100", "10"),
    ("tokenizer_type", "GPT2BPETokenizer", "HFTokenizer"), ("train_micro_batch_size_per_gpu", "none", "4"),
    ("train_iters", "none", "100"), ("wandb_project", "neox", "sepllm-neox"),
    ("use_wandb", "on when wandb is installed and logged in", "false; wandb_mode offline"),
    ("attention (SepLLM reference)", "SepLLM, window 256", "full causal attention unless a SepLLM key is set"),
]


def markdown_table() -> str:
    """docs/neox_compat.md: the whole table, generated from RULES."""
    head = ["# GPT-NeoX and SepLLM config keys", "",
            "Generated from `megatron/config/neox_compat.py` by "
            "`python tools/neox_compat_table.py > docs/neox_compat.md`; `tests/test_neox_compat.py` "
            "fails when the two differ.", "",
            "Every key of GPT-NeoX's `configs/` and of the SepLLM reference's `Training-SepLLM/sample_configs/` "
            "is handled one of three ways. **mapped**: onto our key (same name unless the column says "
            "otherwise) with the NeoX / reference meaning. **no-op**: accepted and listed in one info "
            "line at start-up. **unsupported**: reported with every other problem of the config in one "
            "error. `-` and `_` are interchangeable in every key; keys not listed here are our own "
            "(every key of ours: [config.md](config.md)).", "",
            "| key | source | handling | our key | meaning here |", "| --- | --- | --- | --- | --- |"]
    rows = [f"| `{r.key}` | {r.dialect} | {r.kind} | {'`' + r.target + '`' if r.target[0] != '-' else r.target} | "
            f"{r.note.replace('|', '/')} |" for r in sorted(RULES, key=lambda r: (r.dialect != NEOX, r.key.lower()))]
    defaults = ["", "## Defaults that differ", "",
                "A key a config leaves out takes our default, which is NeoX's except for these:", "",
                "| key | NeoX default | ours |", "| --- | --- | --- |"]
    defaults += [f"| `{k}` | {neox} | {ours} |" for k, neox, ours in DEFAULT_DIFFERENCES]
    return "\n".join(head + rows + defaults) + "\n"

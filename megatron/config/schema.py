"""The typed configuration schema.

YAML keys follow GPT-NeoX names, with NeoX's meaning: most keys are flat at the top level
(``num_layers: 12``) and land in the group that owns them; the sections ``attention``, ``optimizer``,
``zero_optimization`` and ``fp16`` are nested, as in NeoX. Keys that NeoX or the SepLLM reference
spell differently are translated by ``megatron/config/neox_compat.py`` (the table is
docs/neox_compat.md); every field is validated by ``megatron/config/validation.py``. ``-`` and ``_``
are interchangeable in key names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

# NeoX's weight initialisations (megatron/model/init.py implements them with NeoX's formulas).
InitMethodName = Literal["normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
                         "xavier_normal", "wang_init", "small_init", "single_residual_scaled_normal"]


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_kv_heads: Optional[int] = None  # GQA; None = num_attention_heads
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None  # None = seq_length
    make_vocab_size_divisible_by: int = 128
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    layernorm_epsilon: float = 1e-5
    rms_norm_epsilon: Optional[float] = None  # rmsnorm's epsilon; None = layernorm_epsilon
    use_bias_in_norms: bool = True  # layernorm bias (rmsnorm has none)
    pos_emb: Literal["rotary", "learned", "none", "alibi"] = "rotary"
    # BiPE (SepLLM's bilevel positions, USE_BiPE): segments end at a separator; a learned table encodes
    # the position inside the segment, rotary / ALiBi the segment index. None = the Sep-Attention separators.
    bipe: bool = False
    bipe_separator_ids: Optional[List[int]] = None
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    rotary_interleaved: bool = False  # GPT-J pairwise style instead of NeoX rotate-half
    gpt_j_residual: bool = False  # parallel attention + MLP residual (Pythia)
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    # MLP width with NeoX's meaning: None = 4h; gated (swiglu) MLPs take 2/3 of it, split over the two
    # branches, rounded up to mlp_multiple_of (see mlp_sizes). ffn_hidden_size is the literal
    # per-branch width (Megatron-LM's name; what HF configs call intermediate_size) and wins.
    intermediate_size: Optional[int] = None
    mlp_multiple_of: int = 1
    ffn_hidden_size: Optional[int] = None
    no_weight_tying: bool = False
    use_bias_in_attn_linear: bool = True
    use_bias_in_mlp: bool = True
    init_method_std: float = 0.02
    init_method: InitMethodName = "normal"  # embeddings, QKV, MLP input, LM head
    output_layer_init_method: InitMethodName = "scaled_normal"  # attention output, MLP output
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    fused_rope: Optional[bool] = None  # None = auto (Triton on GPU, eager on CPU)
    fused_layernorm: Optional[bool] = None
    fused_cross_entropy: Optional[bool] = None
    checkpoint_activations: bool = False

    @property
    def kv_heads(self) -> int:
        """Key/value heads (GQA); ``num_kv_heads`` unset means one per attention head."""
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def norm_epsilon(self) -> float:
        """The epsilon of the configured norm (NeoX: rms_norm_epsilon for rmsnorm)."""
        if self.norm == "rmsnorm" and self.rms_norm_epsilon is not None:
            return self.rms_norm_epsilon
        return self.layernorm_epsilon


def mlp_sizes(m: ModelConfig) -> Tuple[int, int]:
    """NeoX's MLP sizing: (input projection width, output projection width).

    Start from ``intermediate_size`` (default 4h); a gated MLP takes ``int(2/3 * size)`` for its
    input projection (both branches) and half of that per branch; the input width is rounded up to
    ``2 * mlp_multiple_of`` and the per-branch width to ``mlp_multiple_of``. For a gated MLP the
    first value is both branches together; NeoX only runs when it is exactly twice the second.
    ``ffn_hidden_size`` bypasses the rule (literal per-branch width).
    """
    gated = m.activation == "swiglu"
    if m.ffn_hidden_size:
        return (2 if gated else 1) * m.ffn_hidden_size, m.ffn_hidden_size
    size = m.intermediate_size or 4 * m.hidden_size
    size_in = size
    if gated:
        size = int(size * 2 / 3)
        size_in = size // 2
    k = max(1, m.mlp_multiple_of)
    return 2 * k * -(-size // (2 * k)), k * -(-size_in // k)


def ffn_width(m: ModelConfig) -> int:
    """Width of one MLP branch (the output projection's input)."""
    return mlp_sizes(m)[1]


@dataclass
class SepLLMConfig:
    # A config that says nothing about SepLLM trains what NeoX would: full causal attention.
    mode: Literal["sepllm", "streamingllm", "fixed_interval", "full"] = "full"
    n_init: int = 3
    n_local: int = 64
    interval: int = 5  # fixed_interval: every k-th position acts as a separator
    separator_tokens: List[str] = field(
        default_factory=lambda: [".", ",", "?", "!", ";", ":", " ", "\t", "\n"])
    include_space_prefixed: bool = True
    separator_ids: Optional[List[int]] = None  # overrides separator_tokens when given
    full_attention_layers: List[int] = field(default_factory=list)  # hybrid: H=[0], HT=[0,-1]
    layer_n_local: Dict[int, int] = field(default_factory=dict)  # per-layer window overrides
    separate_documents: bool = False  # never attend across EOD boundaries

    def separator_ids_from(self, tokenizer) -> List[int]:
        """The separator ids: those set by number, else ``tokenizer``'s ids of ``separator_tokens``."""
        if self.separator_ids is not None:
            return list(self.separator_ids)
        return list(tokenizer.separator_ids(self.separator_tokens, self.include_space_prefixed))


@dataclass
class AttentionConfig:
    impl: Literal["auto", "reference", "compact", "flex", "triton", "sdpa", "flash"] = "auto"
    sepllm: SepLLMConfig = field(default_factory=SepLLMConfig)


@dataclass
class ZeroConfig:
    """DeepSpeed's ``zero_optimization`` section (stages 0-2). Keys left unset (None) take
    DeepSpeed's defaults; set ones are passed to DeepSpeed unchanged."""

    stage: int = 0
    allgather_partitions: Optional[bool] = None
    allgather_bucket_size: Optional[int] = None
    overlap_comm: Optional[bool] = None
    reduce_scatter: Optional[bool] = None
    reduce_bucket_size: Optional[int] = None
    contiguous_gradients: Optional[bool] = None
    round_robin_gradients: Optional[bool] = None
    cpu_offload: Optional[bool] = None  # DeepSpeed's older spelling of offload_optimizer: {device: cpu}
    offload_optimizer: Optional[Dict[str, object]] = None
    elastic_checkpoint: Optional[bool] = None
    load_from_fp32_weights: Optional[bool] = None
    ignore_unused_parameters: Optional[bool] = None
    use_multi_rank_bucket_allreduce: Optional[bool] = None


@dataclass
class Fp16Config:
    """DeepSpeed's / GPT-NeoX's ``fp16`` section: fp16 compute with (dynamic) loss scaling when
    ``loss_scale`` is 0, else a static scale. ``precision: fp16`` and ``enabled: true`` mean the same
    (see ``validation.py``)."""

    enabled: bool = False
    loss_scale: float = 0.0  # 0 = dynamic
    initial_scale_power: int = 16  # dynamic scaling starts at 2 ** initial_scale_power
    loss_scale_window: int = 1000  # overflow-free steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0


@dataclass
class ParallelConfig:
    model_parallel_size: int = 1  # tensor parallel
    pipe_parallel_size: int = 1  # 0 is accepted as 1 (NeoX's "no pipeline engine" spelling)
    context_parallel_size: int = 1  # sequence of each micro-batch split over this many ranks
    sequence_parallel: bool = False
    pipe_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    virtual_pipe_stages: int = 1
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class OptimizerParams:
    lr: float = 6e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class OptimizerConfig:
    type: Literal["adam", "adamw"] = "adamw"
    params: OptimizerParams = field(default_factory=OptimizerParams)


@dataclass
class TrainingConfig:
    train_micro_batch_size_per_gpu: int = 4
    gradient_accumulation_steps: int = 1
    train_batch_size: Optional[int] = None  # checked against micro * accum * dp when given
    train_iters: int = 100
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp16: Fp16Config = field(default_factory=Fp16Config)  # a top-level YAML section, as in NeoX
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # None = train_iters
    warmup: float = 0.01  # fraction of lr_decay_iters, as in NeoX
    warmup_iters: Optional[int] = None  # absolute warmup iterations; overrides warmup when set
    min_lr: float = 0.0
    eval_interval: int = 100
    eval_iters: int = 10
    exit_interval: Optional[int] = None  # stop (after saving) once iteration % exit_interval == 0
    max_skipped_steps: int = 20  # stop (exit 3) after this many consecutive non-finite (skipped) steps
    eval_tasks: Optional[List[str]] = None
    """lm-eval tasks (local docs_* or lm-eval's) run on the model at every eval_interval, as in NeoX."""
    eval_task_data: Optional[str] = None
    """Folder of the local tasks' data for eval_tasks (None = data/eval)."""
    eval_limit: Optional[float] = None
    """Examples per task for eval_tasks (a fraction if < 1; None = all)."""


@dataclass
class DataConfig:
    data_path: Optional[str] = None
    train_data_paths: Optional[List[str]] = None
    valid_data_paths: Optional[List[str]] = None
    test_data_paths: Optional[List[str]] = None
    train_data_weights: Optional[List[float]] = None
    split: str = "969,30,1"
    tokenizer_type: Literal["HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"] = "HFTokenizer"
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    data_cache_dir: Optional[str] = None
    num_workers: int = 0


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    checkpoint_factor: int = 0  # save every N iterations (0 = only at the end)
    extra_save_iters: List[int] = field(default_factory=list)  # also save at these (0 = before training)
    keep_last_n_checkpoints: Optional[int] = None
    finetune: bool = False  # load weights only: reset optimizer, iteration and data position
    iteration: Optional[int] = None
    """The step to load from load: (global_stepN); None = the one 'latest' names."""
    checkpoint_scale: Literal["linear", "log"] = "linear"
    """linear: save every checkpoint_factor iterations; log: at 1 and every power of checkpoint_factor."""
    checkpoint_validation_with_forward_pass: bool = False
    """Save the loss of a fixed batch with each checkpoint and check it after loading."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    use_wandb: bool = False
    wandb_project: str = "sepllm-neox"
    wandb_group: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_entity: Optional[str] = None  # NeoX: wandb_team
    wandb_host: Optional[str] = None  # e.g. https://api.wandb.ai
    wandb_run_name: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    log_dir: Optional[str] = None  # JSONL metrics file goes here
    peak_theoretical_tflops: Optional[float] = None  # per device, for MFU; None = look up the device
    kv_ratio_interval: Optional[int] = None  # log the Sep-Attention kept-KV fraction every N iterations
    profile: bool = False
    """torch.profiler traces (and NVTX ranges on CUDA) of iterations profile_step_start + 1 .. profile_step_stop."""
    profile_step_start: int = 10
    """The iteration before the first profiled one (it runs as the profiler's warm-up)."""
    profile_step_stop: int = 12
    """The last profiled iteration."""
    memory_profiling: bool = False
    """A CUDA memory snapshot (peak RSS without CUDA) of the profiled iterations, in memory_profiling_path."""
    memory_profiling_path: Optional[str] = None
    """Directory for memory_profiling's mem_snapshot.pickle / peak_rss.json."""
    log_param_norm: bool = False
    """Log every parameter's norm (parameter_norms/NAME) and the total (param_norm) at each log_interval."""
    log_grad_norm: bool = False
    """Log every parameter's gradient norm (gradient_norms/NAME), before clipping."""
    log_grad_pct_zeros: bool = False
    """Log the per cent of exact zeros in every parameter's gradient (pct_grad_zeros/NAME)."""
    log_optimizer_states: bool = False
    """Log the norm of every parameter's AdamW moments (optimizer_state_norms/NAME_exp_avg, _exp_avg_sq)."""
    log_gradient_noise_scale: bool = False
    """Estimate and log the gradient noise scale (noise_scale), as NeoX does."""
    gradient_noise_scale_n_batches: int = 5
    """Consecutive global batches whose mean gradient is the noise scale's large batch."""
    gradient_noise_scale_cpu_offload: bool = False
    """Keep the noise scale's gradient buffer in CPU memory."""


@dataclass
class LaunchConfig:
    """What deepy.py launches (its command-line flags override these)."""

    hostfile: Optional[str] = None  # DeepSpeed format: 'host slots=N' per line
    # multi-node: per-node torchrun, the deepspeed launcher, or srun inside a SLURM allocation
    launcher: Literal["torchrun", "deepspeed", "slurm"] = "torchrun"
    num_gpus: Optional[int] = None  # processes per node; None = GPUs present, else tp x pp
    global_num_gpus: Optional[int] = None  # the world size, checked against the launch
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    deepspeed_slurm: bool = False  # an srun task takes its rank and world size from SLURM's environment
    comment: Optional[str] = None  # srun --comment (launcher slurm)
    account: Optional[str] = None  # srun --account (launcher slurm)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# Groups whose fields are flat top-level YAML keys.
FLAT_GROUPS = ("model", "parallel", "training", "data", "checkpoint", "logging", "launch")
# Groups that appear as one nested YAML section under their own name.
NESTED_GROUPS = ("attention", "optimizer")

"""The typed configuration schema.

YAML keys follow GPT-NeoX names so NeoX configs port with few edits. Most keys are flat at the
top level (``num_layers: 12``) and land in the group that owns them; the sections ``attention``,
``optimizer`` and ``zero_optimization`` are nested, as in NeoX. Every field is validated by
``megatron.config.loader``; ``-`` and ``_`` are interchangeable in key names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional


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
    pos_emb: Literal["rotary", "learned", "none"] = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    rotary_interleaved: bool = False  # GPT-J pairwise style instead of NeoX rotate-half
    gpt_j_residual: bool = False  # parallel attention + MLP residual (Pythia)
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    intermediate_size: Optional[int] = None  # None = 4h (gelu/relu) or 8h/3 rounded to 64 (swiglu)
    no_weight_tying: bool = False
    use_bias_in_attn_linear: bool = True
    use_bias_in_mlp: bool = True
    init_method_std: float = 0.02
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


@dataclass
class SepLLMConfig:
    mode: Literal["sepllm", "streamingllm", "fixed_interval", "full"] = "sepllm"
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


@dataclass
class AttentionConfig:
    impl: Literal["auto", "reference", "compact", "flex", "sdpa", "flash"] = "auto"
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
    precision: Literal["fp32", "bf16"] = "fp32"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # None = train_iters
    warmup: float = 0.01  # fraction of lr_decay_iters, as in NeoX
    min_lr: float = 0.0
    eval_interval: int = 100
    eval_iters: int = 10
    exit_interval: Optional[int] = None  # stop (after saving) once iteration % exit_interval == 0


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
    keep_last_n_checkpoints: Optional[int] = None
    finetune: bool = False  # load weights only: reset optimizer, iteration and data position


@dataclass
class LoggingConfig:
    log_interval: int = 10
    use_wandb: bool = False
    wandb_project: str = "sepllm-neox"
    wandb_group: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tensorboard_dir: Optional[str] = None
    log_dir: Optional[str] = None  # JSONL metrics file goes here


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


# Groups whose fields are flat top-level YAML keys.
FLAT_GROUPS = ("model", "parallel", "training", "data", "checkpoint", "logging")
# Groups that appear as one nested YAML section under their own name.
NESTED_GROUPS = ("attention", "optimizer")

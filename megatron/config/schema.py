"""The typed configuration schema.

YAML keys follow GPT-NeoX names, with NeoX's meaning: most keys are flat at the top level
(``num_layers: 12``) and land in the group that owns them; the sections ``attention``, ``optimizer``,
``zero_optimization`` and ``fp16`` are nested, as in NeoX. Keys that NeoX or the SepLLM reference
spell differently are translated by ``megatron/config/neox_compat.py`` (the table is
docs/neox_compat.md); every field is validated by ``megatron/config/validation.py``. ``-`` and ``_``
are interchangeable in key names. Each field's description is the string on the line after it;
docs/config.md is generated from them (``python -m megatron.config.docs > docs/config.md``).
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
    """Transformer blocks."""
    hidden_size: int = 128
    """Width of the residual stream (the embedding size)."""
    num_attention_heads: int = 4
    """Query heads per layer; hidden_size must be a multiple of it."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); null = num_attention_heads."""
    seq_length: int = 256
    """Tokens per training sample."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (pos_emb learned); null = seq_length."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded to a multiple of this x model_parallel_size."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation of each block's inputs and of the final hidden states."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of layernorm (and of rmsnorm when rms_norm_epsilon is unset)."""
    rms_norm_epsilon: Optional[float] = None
    """Epsilon of rmsnorm; null = layernorm_epsilon."""
    use_bias_in_norms: bool = True
    """Layernorm has a bias (rmsnorm has none either way)."""
    pos_emb: Literal["rotary", "learned", "none", "alibi"] = "rotary"
    """Position encoding: rotary (RoPE), a learned table, none, or ALiBi biases on the scores."""
    bipe: bool = False
    """BiPE (SepLLM's bilevel positions): a learned table inside a segment, rotary / ALiBi over segments."""
    bipe_separator_ids: Optional[List[int]] = None
    """Token ids that end a BiPE segment; null = the Sep-Attention separators."""
    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that rotary rotates (Pythia: 0.25)."""
    rotary_emb_base: float = 10000.0
    """Base of the rotary frequencies (HF: rope_theta)."""
    rotary_interleaved: bool = False
    """Rotate adjacent pairs (GPT-J style) instead of NeoX's two halves."""
    gpt_j_residual: bool = False
    """Attention and MLP read the same input and add to one residual, each with its own norm (Pythia)."""
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    """MLP activation; swiglu is gated (two input branches)."""
    intermediate_size: Optional[int] = None
    """MLP width with NeoX's meaning: null = 4 x hidden_size; swiglu takes 2/3 of it (see mlp_sizes)."""
    mlp_multiple_of: int = 1
    """The MLP widths from intermediate_size are rounded up to a multiple of this (NeoX's rule)."""
    ffn_hidden_size: Optional[int] = None
    """Literal width of one MLP branch (HF's intermediate_size); set this or intermediate_size."""
    no_weight_tying: bool = False
    """The output layer has its own weights instead of the input embedding's."""
    use_bias_in_attn_linear: bool = True
    """The QKV and attention output projections have biases."""
    use_bias_in_mlp: bool = True
    """The MLP projections have biases."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisations."""
    init_method: InitMethodName = "normal"
    """Initialisation of the embeddings, QKV, MLP input and output layer."""
    output_layer_init_method: InitMethodName = "scaled_normal"
    """Initialisation of the attention and MLP output projections."""
    hidden_dropout: float = 0.0
    """Dropout on the attention and MLP outputs before they join the residual."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (dense kernels and full-attention layers only)."""
    fused_rope: Optional[bool] = None
    """Triton rotary kernel; null = auto (Triton on GPU, eager on CPU)."""
    fused_layernorm: Optional[bool] = None
    """Triton layernorm / rmsnorm kernel; null = auto (Triton on GPU, eager on CPU)."""
    fused_cross_entropy: Optional[bool] = None
    """Triton cross-entropy kernel; null = auto (Triton on GPU, eager on CPU)."""
    checkpoint_activations: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them."""

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
    """The ``attention.sepllm`` section: which keys each query sees. A config that says nothing about
    SepLLM trains what NeoX would: full causal attention."""

    mode: Literal["sepllm", "streamingllm", "fixed_interval", "full"] = "full"
    """Attention rule: SepLLM, StreamingLLM (initial + local), fixed-interval separators, or full causal."""
    n_init: int = 3
    """Initial tokens every query sees."""
    n_local: int = 64
    """Local window, counting the query itself."""
    interval: int = 5
    """fixed_interval: every interval-th position acts as a separator."""
    separator_tokens: List[str] = field(
        default_factory=lambda: [".", ",", "?", "!", ";", ":", " ", "\t", "\n"])
    """Separator strings, looked up in the tokenizer's vocabulary."""
    include_space_prefixed: bool = True
    """Also count each separator's space-prefixed token (' ,') as a separator."""
    separator_ids: Optional[List[int]] = None
    """Separator token ids; when set, separator_tokens is not used."""
    full_attention_layers: List[int] = field(default_factory=list)
    """Layers with full causal attention (hybrid variants: H = [0], HT = [0, -1]; negative counts from the end)."""
    layer_n_local: Dict[int, int] = field(default_factory=dict)
    """Per-layer local windows: {layer: n_local}; other layers use n_local."""
    separate_documents: bool = False
    """Attention never crosses an end-of-document token; each document has its own initial tokens."""

    def separator_ids_from(self, tokenizer) -> List[int]:
        """The separator ids: those set by number, else ``tokenizer``'s ids of ``separator_tokens``."""
        if self.separator_ids is not None:
            return list(self.separator_ids)
        return list(tokenizer.separator_ids(self.separator_tokens, self.include_space_prefixed))


@dataclass
class AttentionConfig:
    impl: Literal["auto", "reference", "compact", "flex", "triton", "sdpa", "flash"] = "auto"
    """Attention kernel of the Sep-Attention layers; auto: compact on CPU, flex or triton on CUDA."""
    sepllm: SepLLMConfig = field(default_factory=SepLLMConfig)
    """The Sep-Attention rule: which keys each query sees."""


@dataclass
class ZeroConfig:
    """DeepSpeed's ``zero_optimization`` section (stages 0-2). Keys left unset (None) take
    DeepSpeed's defaults; set ones are passed to DeepSpeed unchanged."""

    stage: int = 0
    """ZeRO stage: 0 (our data-parallel all-reduce), 1 (optimizer state sharded) or 2 (gradients too)."""
    allgather_partitions: Optional[bool] = None
    """DeepSpeed: all-gather the updated parameters (else broadcast)."""
    allgather_bucket_size: Optional[int] = None
    """DeepSpeed: elements all-gathered at a time."""
    overlap_comm: Optional[bool] = None
    """DeepSpeed: overlap gradient reduction with the backward pass."""
    reduce_scatter: Optional[bool] = None
    """DeepSpeed: reduce gradients with reduce-scatter (else all-reduce)."""
    reduce_bucket_size: Optional[int] = None
    """DeepSpeed: elements reduced at a time."""
    contiguous_gradients: Optional[bool] = None
    """DeepSpeed: copy gradients into one contiguous buffer as they are produced."""
    round_robin_gradients: Optional[bool] = None
    """DeepSpeed: stage 2 gradient partitioning in round-robin order."""
    cpu_offload: Optional[bool] = None
    """DeepSpeed's older spelling of offload_optimizer: {device: cpu}."""
    offload_optimizer: Optional[Dict[str, object]] = None
    """DeepSpeed: optimizer state and step on another device ({device: cpu, ...})."""
    elastic_checkpoint: Optional[bool] = None
    """DeepSpeed: optimizer checkpoints loadable on another data-parallel size."""
    load_from_fp32_weights: Optional[bool] = None
    """DeepSpeed: restore the fp32 master weights from the checkpoint's fp32 copy."""
    ignore_unused_parameters: Optional[bool] = None
    """DeepSpeed: parameters without gradients are no error."""
    use_multi_rank_bucket_allreduce: Optional[bool] = None
    """DeepSpeed: all-reduce buckets from several ranks together."""


@dataclass
class Fp16Config:
    """DeepSpeed's / GPT-NeoX's ``fp16`` section: fp16 compute with (dynamic) loss scaling when
    ``loss_scale`` is 0, else a static scale. ``precision: fp16`` and ``enabled: true`` mean the same
    (``compat_groups.precision`` sets both)."""

    enabled: bool = False
    """fp16 is on; always equal to precision == fp16 (either spelling sets both)."""
    loss_scale: float = 0.0
    """Static loss scale; 0 = dynamic scaling."""
    initial_scale_power: int = 16
    """Dynamic scaling starts at 2 ** initial_scale_power."""
    loss_scale_window: int = 1000
    """Overflow-free steps before the dynamic scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic scale halves."""
    min_loss_scale: float = 1.0
    """The dynamic scale never drops below this."""


@dataclass
class ParallelConfig:
    model_parallel_size: int = 1
    """Tensor-parallel ranks: attention heads and MLP columns split over them."""
    pipe_parallel_size: int = 1
    """Pipeline stages (NeoX's 0, no pipeline engine, is read as 1)."""
    context_parallel_size: int = 1
    """Ranks the sequence of each micro-batch is split over."""
    sequence_parallel: bool = False
    """Norms and dropout run on a tensor-parallel rank's share of the sequence."""
    pipe_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule of the micro-batches."""
    virtual_pipe_stages: int = 1
    """Model chunks per pipeline rank (interleaved_1f1b needs > 1)."""
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO settings."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl on CUDA, gloo otherwise (nccl without CUDA falls back)."""


@dataclass
class OptimizerParams:
    lr: float = 6e-4
    """Peak learning rate (after warmup)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's beta1 and beta2."""
    eps: float = 1e-8
    """Adam's epsilon."""


@dataclass
class OptimizerConfig:
    type: Literal["adam", "adamw"] = "adamw"
    """Both mean Adam with decoupled weight decay (AdamW), as NeoX's Adam does."""
    params: OptimizerParams = field(default_factory=OptimizerParams)
    """Learning rate, betas, eps."""


@dataclass
class TrainingConfig:
    train_micro_batch_size_per_gpu: int = 4
    """Samples per forward pass on one data-parallel rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (the pipeline's micro-batches)."""
    train_batch_size: Optional[int] = None
    """Samples per optimizer step; checked against micro x accumulation x data-parallel size when set."""
    train_iters: int = 100
    """Optimizer steps to train."""
    seed: int = 1234
    """Seed of the weights, dropout and data order."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: fp32, bf16 (autocast), or fp16 with loss scaling."""
    fp16: Fp16Config = field(default_factory=Fp16Config)
    """fp16 loss scaling (a top-level section, as in NeoX)."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    clip_grad: float = 1.0
    """Clip gradients to this global norm; 0 = no clipping."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays to min_lr; null = train_iters."""
    warmup: float = 0.01
    """Warmup as a fraction of lr_decay_iters, as in NeoX."""
    warmup_iters: Optional[int] = None
    """Warmup in iterations; overrides warmup when set."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    eval_interval: int = 100
    """Iterations between validation runs."""
    eval_iters: int = 10
    """Batches per validation run and for the final test run."""
    exit_interval: Optional[int] = None
    """Stop (after saving) once iteration % exit_interval == 0."""
    max_skipped_steps: int = 20
    """Stop (exit 3) after this many consecutive non-finite (skipped) steps."""
    eval_tasks: Optional[List[str]] = None
    """lm-eval tasks (local docs_* or lm-eval's) run on the model at every eval_interval, as in NeoX."""
    eval_task_data: Optional[str] = None
    """Folder of the local tasks' data for eval_tasks (None = data/eval)."""
    eval_limit: Optional[float] = None
    """Examples per task for eval_tasks (a fraction if < 1; None = all)."""


@dataclass
class DataConfig:
    data_path: Optional[str] = None
    """One indexed dataset (prefix of .bin/.idx) divided into train / valid / test by split."""
    train_data_paths: Optional[List[str]] = None
    """Training datasets (prefixes), blended by train_data_weights; instead of data_path."""
    valid_data_paths: Optional[List[str]] = None
    """Validation datasets (prefixes)."""
    test_data_paths: Optional[List[str]] = None
    """Test datasets (prefixes), evaluated at the end of training."""
    train_data_weights: Optional[List[float]] = None
    """Blending weights of train_data_paths; null = in proportion to their token counts."""
    split: str = "969,30,1"
    """Train, valid, test weights dividing data_path."""
    tokenizer_type: Literal["HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer", "HFGPT2Tokenizer",
                            "CharLevelTokenizer"] = "HFTokenizer"
    """Tokenizer kind: tokenizers JSON (HFGPT2Tokenizer: GPT-2's), SentencePiece, GPT-2 BPE, or UTF-8 bytes."""
    vocab_file: Optional[str] = None
    """Tokenizer file (tokenizer.json, .model, or GPT-2 vocab.json)."""
    merge_file: Optional[str] = None
    """GPT-2 BPE merges file (GPT2BPETokenizer)."""
    data_cache_dir: Optional[str] = None
    """Folder of the sample index caches; null = next to each dataset."""
    num_workers: int = 0
    """Background DataLoader workers preparing batches; 0 = in the training process."""


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory checkpoints are saved to; null = no checkpoints."""
    load: Optional[str] = None
    """Checkpoint to start from (a save directory or global_stepN); missing or empty: from scratch."""
    checkpoint_factor: int = 0
    """Save every N iterations (0 = only at the end)."""
    extra_save_iters: List[int] = field(default_factory=list)
    """Also save at these iterations (0 = before training)."""
    keep_last_n_checkpoints: Optional[int] = None
    """Keep the last N checkpoints this run wrote; null = keep all."""
    finetune: bool = False
    """Load weights only: reset optimizer, iteration and data position."""
    iteration: Optional[int] = None
    """The step to load from load: (global_stepN); None = the one 'latest' names."""
    checkpoint_scale: Literal["linear", "log"] = "linear"
    """linear: save every checkpoint_factor iterations; log: at 1 and every power of checkpoint_factor."""
    checkpoint_validation_with_forward_pass: bool = False
    """Save the loss of a fixed batch with each checkpoint and check it after loading."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Iterations between metrics lines."""
    use_wandb: bool = False
    """Log metrics to Weights & Biases."""
    wandb_project: str = "sepllm-neox"
    """wandb project."""
    wandb_group: Optional[str] = None
    """wandb group of the run."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; online without credentials logs offline (WANDB_MODE wins)."""
    wandb_entity: Optional[str] = None
    """wandb team or user."""
    wandb_host: Optional[str] = None
    """wandb server, e.g. https://api.wandb.ai."""
    wandb_run_name: Optional[str] = None
    """wandb run name."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard events here (needs the tensorboard package)."""
    log_dir: Optional[str] = None
    """Folder of the metrics.jsonl file (and wandb's files)."""
    peak_theoretical_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, for MFU; null = look the device up."""
    kv_ratio_interval: Optional[int] = None
    """Log the Sep-Attention kept-KV fraction every N iterations."""
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

    hostfile: Optional[str] = None
    """DeepSpeed-format hostfile ('host slots=N' per line) for several nodes."""
    launcher: Literal["torchrun", "deepspeed", "slurm"] = "torchrun"
    """Multi-node launch: torchrun per node, the deepspeed launcher, or srun inside a SLURM allocation."""
    num_gpus: Optional[int] = None
    """Processes per node; null = GPUs present, else tp x pp x cp (one model replica)."""
    global_num_gpus: Optional[int] = None
    """The world size, checked against the launch."""
    master_addr: Optional[str] = None
    """Address of rank 0; null = 127.0.0.1 on one node, the first host with a hostfile."""
    master_port: Optional[int] = None
    """Port of rank 0; null = 29500."""
    deepspeed_slurm: bool = False
    """An srun task takes its rank and world size from SLURM's environment."""
    comment: Optional[str] = None
    """srun --comment (launcher slurm)."""
    account: Optional[str] = None
    """srun --account (launcher slurm)."""
    include: Optional[str] = None
    """DeepSpeed's host selection: only these hosts, 'node-a@node-b:0,2' (slots of a host after ':')."""
    exclude: Optional[str] = None
    """DeepSpeed's host selection: leave these hosts (or host:slots) out, as include."""
    num_nodes: int = -1
    """The first N hosts left after include/exclude; -1 = all."""


@dataclass
class GenerationConfig:
    """generate.py's settings: NeoX's text_generation.yml keys with NeoX's meaning, and the bounded
    Streaming-SepLLM cache it generates through (tools/generate.py's flags and defaults)."""

    text_gen_type: Optional[Literal["unconditional", "input-file", "interactive"]] = None
    """Unconditional samples, a completion per prompt of sample_input_file, or prompts from stdin."""
    maximum_tokens: int = 64
    """Tokens generated per sample at most (fewer when the end-of-document or the model's eos comes first)."""
    prompt_end: str = "\n"
    """What ends one prompt in sample_input_file and in interactive input."""
    temperature: float = 0.0
    """Divides the logits before sampling; greedy when temperature, top_k and top_p are all 0 (NeoX)."""
    top_p: float = 0.0
    """Nucleus sampling: the smallest set of tokens holding this probability mass; 0 = off (NeoX)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off."""
    recompute: bool = False
    """No KV cache: the whole sequence through the model's rule at every token, up to seq_length."""
    num_samples: int = 1
    """Unconditional samples to generate."""
    sample_input_file: Optional[str] = None
    """The prompts of text_gen_type input-file, separated by prompt_end."""
    sample_output_file: Optional[str] = "samples.txt"
    """JSON lines of the samples, NeoX's fields; null with input-file: INPUT.output.jsonl."""
    cache_policy: Literal["sepllm", "streamingllm", "full"] = "sepllm"
    """The streaming KV cache's policy (tools/generate.py --policy)."""
    init_cache_size: int = 4
    """Initial tokens the cache keeps (a)."""
    sep_cache_size: int = 64
    """Separators the cache keeps (s)."""
    local_size: int = 256
    """Most recent tokens the cache keeps at a compression (w)."""
    cache_size: int = 800
    """The cache's total budget, entries per layer (c)."""
    pos_shift: bool = True
    """Rotate keys by their place in the cache (false: by stream position)."""
    decode_mask: Literal["cache", "rule"] = "cache"
    """'cache': attend to every cached key; 'rule': the layer's Sep-Attention rule inside the cache."""
    prefill_chunk: Optional[int] = None
    """Prefill at most this many prompt tokens per forward."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape, positions, MLP, initialisation, kernels."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention kernel and Sep-Attention rule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, pipeline, context and data parallelism, ZeRO."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and its parameters."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch, schedule, precision, evaluation and stopping."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, wandb, TensorBoard."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """What deepy.py launches."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """What generate.py generates (NeoX's text_generation.yml keys) and its streaming cache."""


# Groups whose fields are flat top-level YAML keys.
FLAT_GROUPS = ("model", "parallel", "training", "data", "checkpoint", "logging", "launch", "generation")
# Groups that appear as one nested YAML section under their own name.
NESTED_GROUPS = ("attention", "optimizer")

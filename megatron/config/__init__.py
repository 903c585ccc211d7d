"""Typed configuration: the schema, YAML loading and merging, NeoX / SepLLM compatibility, validation."""
from megatron.config.loader import config_to_tree, dump_config, load_config
from megatron.config.schema import (
                                    AttentionConfig,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    Fp16Config,
                                    LaunchConfig,
                                    LoggingConfig,
                                    ModelConfig,
                                    OptimizerConfig,
                                    ParallelConfig,
                                    SepLLMConfig,
                                    TrainingConfig,
                                    ZeroConfig,
)
from megatron.config.validation import (
    config_from_tree,
    validate_device,
    validate_launch,
    validate_layout,
    validate_model_split,
)

__all__ = ["config_from_tree", "config_to_tree", "dump_config", "load_config", "validate_device",
           "validate_launch", "validate_layout", "validate_model_split", "AttentionConfig", "CheckpointConfig",
           "Config", "DataConfig", "Fp16Config", "LaunchConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
           "ParallelConfig", "SepLLMConfig", "TrainingConfig", "ZeroConfig"]

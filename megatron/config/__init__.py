"""Typed configuration: the schema, YAML loading and merging, and validation."""
from megatron.config.loader import config_to_tree, dump_config, load_config, merge_files
from megatron.config.schema import (
                                    AttentionConfig,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    LoggingConfig,
                                    ModelConfig,
                                    OptimizerConfig,
                                    ParallelConfig,
                                    SepLLMConfig,
                                    TrainingConfig,
                                    ZeroConfig,
)
from megatron.config.validation import config_from_tree, validate_launch, validate_layout, validate_model_split

__all__ = ["config_from_tree", "config_to_tree", "dump_config", "load_config", "merge_files",
           "validate_launch", "validate_layout", "validate_model_split", "AttentionConfig", "CheckpointConfig",
           "Config",
           "DataConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
           "SepLLMConfig", "TrainingConfig", "ZeroConfig"]

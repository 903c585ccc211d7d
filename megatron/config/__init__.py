from megatron.config.loader import (ConfigError, config_from_tree, config_to_tree, dump_config,
                                    load_config, validate_layout)
from megatron.config.schema import (AttentionConfig, CheckpointConfig, Config, DataConfig,
                                    LoggingConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                    SepLLMConfig, TrainingConfig)

__all__ = ["ConfigError", "config_from_tree", "config_to_tree", "dump_config", "load_config",
           "validate_layout", "AttentionConfig", "CheckpointConfig", "Config", "DataConfig",
           "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "SepLLMConfig",
           "TrainingConfig"]

"""YAML configs and their pydantic schema."""

from configs.errors import ConfigError
from configs.schema import (
    DEFAULT_CONFIG,
    EmbeddedModelConfig,
    ModelConfig,
    PipelineConfig,
    PretrainConfig,
    SamplingConfig,
    TrainConfig,
    load_config,
    parse_config,
)

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "EmbeddedModelConfig",
    "ModelConfig",
    "PipelineConfig",
    "PretrainConfig",
    "SamplingConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
]

"""YAML configs and their pydantic schema; the bottom layer, importing nothing of the project.

``schema``
    The typed sections (model, runtime, pretraining, sampling, training, composition, objectives) and
    ``load_config``; ``default.yaml``, ``tiny.yaml``, ``quadratic.yaml`` and ``sd15.yaml`` beside it.
``overrides``
    ``--set section.field=value``, applied to the mapping before it is validated.
``errors``
    ``MsddaError``, the base of every one-line user error, ``ConfigError`` and ``first_line``.
"""

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

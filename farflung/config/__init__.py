"""Configuration: dataclasses for every part, loaded from TOML, validated in one place."""

from farflung.config.load import (
    ConfigError,
    check_batch,
    check_pipeline,
    config_from_dict,
    config_to_toml,
    field_docs,
    load_config,
    read_json,
    validate,
)
from farflung.config.schema import (
    SECTIONS,
    Config,
    DataConfig,
    ElasticConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PipelineConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PipelineConfig",
    "TrainConfig",
    "ElasticConfig",
    "check_batch",
    "check_pipeline",
    "config_from_dict",
    "config_to_toml",
    "field_docs",
    "load_config",
    "read_json",
    "validate",
]

"""Every setting of a run: nested dataclasses, YAML files, `--set a.b=c` overrides, validation.

The one config package; import it as `spatialnet_dist.config` (`config.load(path, overrides)`, `config.Config`).
Errors are `ConfigError` with a one-line message that names the key (and the closest valid key for a typo) so
the CLI can print it and exit before any worker starts. Its modules, each standing on the ones after it:

- loader.py: `load` (defaults <- YAML file <- overrides, then validation), `from_dict`, `parse_override`.
- schema.py: the dataclasses of every section, with each key's default and comment; `tasks.<task>` sections are
  made from the task registry (spatialnet_dist/tasks). Its docstring says how to list every key. The sections a
  task reads (TaskConfig, ModelConfig, LossConfig) are re-exported from spatialnet_dist/task_sections.py, below
  the registry, so that the task modules import them without importing config.
- coercion.py: writing a nested dict into the dataclasses, checking each key and each value's type.
- checks.py: what values each key may hold, and which names may stand under tasks. and loss.weights.
"""

from spatialnet_dist.config.loader import from_dict, load, parse_override
from spatialnet_dist.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    FaultsConfig,
    KnnConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    TasksConfig,
    TrainConfig,
    tasks_config_class,
)
from spatialnet_dist.errors import ConfigError
from spatialnet_dist.task_sections import LossConfig, ModelConfig, TaskConfig

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "FaultsConfig", "KnnConfig", "LogConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "RunConfig", "TaskConfig", "TasksConfig", "TrainConfig", "from_dict", "load",
    "parse_override", "tasks_config_class",
]

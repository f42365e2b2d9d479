"""One typed config tree for every run: the schema (`schema.py`: every field with its doc and its
choices), the invariants between fields (`checks.py`), and loading (`load.py`: YAML and dotted
overrides onto the defaults, then validation). Unknown keys, wrong types and violated invariants
raise `ConfigError` at load time, naming the field and the fix, before Ray, a GPU or a model is
touched. `python -m treegrpo_ray.run --help` prints every field with its doc."""
from treegrpo_ray.config.checks import decisions_per_iteration, groups_per_iteration, leaves_per_iteration, validate
from treegrpo_ray.config.load import (BUNDLED, MOVED, bundled_file, bundled_names, describe, find_config, flatten,
                                      from_dict, load_config, to_dict)
from treegrpo_ray.config.schema import (AdvantageConfig, CheckpointConfig, Config, ConfigError, LearnerConfig,
                                        ModelConfig, PoolsConfig, ResourcesConfig, RewardsConfig, RewardTerm,
                                        TrackingConfig, TreeConfig, choices, get_dotted)

__all__ = ["AdvantageConfig", "BUNDLED", "CheckpointConfig", "Config", "ConfigError", "LearnerConfig", "MOVED",
           "ModelConfig", "PoolsConfig", "ResourcesConfig", "RewardTerm", "RewardsConfig", "TrackingConfig",
           "TreeConfig", "bundled_file", "bundled_names", "choices", "decisions_per_iteration", "describe",
           "find_config", "flatten", "from_dict", "get_dotted", "groups_per_iteration", "leaves_per_iteration",
           "load_config", "to_dict", "validate"]

"""Run configuration: Pydantic models, YAML loading with overrides, DeepSpeed config rendering."""

from trainer.config.load import Overrides, config_hash, config_to_dict, config_to_yaml, flatten, load_config
from trainer.config.schema import RunConfig

__all__ = ["Overrides", "RunConfig", "config_hash", "config_to_dict", "config_to_yaml", "flatten", "load_config"]

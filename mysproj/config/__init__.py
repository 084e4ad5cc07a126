# `stages` is imported with the package: it registers every stage config with the unknown-variable warning.
from mysproj.config import stages  # noqa: F401
from mysproj.config.fields import ConfigError, config_hash, config_to_dict, load_config, opt

__all__ = ["ConfigError", "config_hash", "config_to_dict", "load_config", "opt"]

from mysproj.config.fields import ConfigError, config_hash, config_to_dict, load_config, opt

__all__ = ["ConfigError", "config_hash", "config_to_dict", "load_config", "opt"]

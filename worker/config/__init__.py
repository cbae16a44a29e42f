"""The configuration: a YAML job list -> a frozen, validated Config.

    model.py      the settings dataclasses (each default written once), ConfigError
    durations.py  '30s', '1h30m' <-> seconds
    yamlfile.py   reading the file: data, line numbers, env expansion
    masking.py    secrets out of any text or URL that is shown
    urls.py       database URLs: parsed, the dialect loaded, its driver imported
    schema.py     the checks and their messages; load()

The public names are re-exported here; import them from `worker.config`.
"""
from .durations import format_duration, parse_duration
from .masking import mask_secrets, masked_url
from .model import (CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, ClusterSettings, Config,
                    ConfigError, DatabaseSettings, HistorySettings, JobSpec, RetryPolicy,
                    WorkerSettings)
from .schema import load
from .yamlfile import expand_env

__all__ = [
    "CONFIG_ENV_VAR", "DEFAULT_CONFIG_PATH", "ClusterSettings", "Config", "ConfigError",
    "DatabaseSettings", "HistorySettings", "JobSpec", "RetryPolicy", "WorkerSettings", "expand_env",
    "format_duration", "load", "mask_secrets", "masked_url", "parse_duration",
]

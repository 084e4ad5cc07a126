"""Typed stage configs: one dataclass per stage is the single source for YAML keys, CLI flags,
`MYSPROJ_<FIELD>` environment variables and the chart's per-stage Helm values (`mysproj.kube.values_schema`).

Precedence, lowest to highest: dataclass default < YAML file < environment < command line. Every value is
coerced to the field's type and range-checked; a bad one raises `ConfigError` naming the field, the value
and what is allowed (exit code `EXIT_BAD_INPUT`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from typing import Any

import yaml

from mysproj.errors import BadInput, has_uri_credentials, redact
from mysproj.storage import read_text
from mysproj.storage.config_key import config_hash, config_to_dict, input_fields  # noqa: F401 - the config API

log = logging.getLogger(__name__)
ENV_PREFIX = "MYSPROJ_"
# Every MYSPROJ_* variable that is not a config field, with who reads it; any other MYSPROJ_* name that no config
# class has is taken for a typo and warned about.
NON_FIELD_ENV = {
    "MYSPROJ_CACHE_DIR": "local cache of remote inputs and file hashes (storage)",
    "MYSPROJ_SCRATCH": "the pod's scratch folder (job entry points)",
    "MYSPROJ_LOG_LEVEL": "log level (cli)",
    "MYSPROJ_RUN": "the run's name (chart)",
    "MYSPROJ_S3_ENDPOINT": "S3 endpoint (storage; also a CI variable)",
    "MYSPROJ_GIT_SHA": "code version in manifests",
    "MYSPROJ_NPROC_PER_NODE": "torchrun processes per fine-tuning pod (mysproj/kube/entry.py)",
    "MYSPROJ_DNS_WAIT_SECONDS": "wait for rank 0's DNS name (mysproj/kube/entry.py)",
    "MYSPROJ_STORAGE_RETRY_SECONDS": "retry budget of storage calls",
    "MYSPROJ_LEASE_SECONDS": "time to live of an S3 output lease (mysproj/storage/lease.py)",
    "MYSPROJ_LEASE_WAIT_SECONDS": "how long a writer waits for another's output lease (mysproj/storage/lease.py)",
    "MYSPROJ_JOB_NAME": "the stage Job's name (failure records)",
    "MYSPROJ_NODE": "the DAG node a stage Job runs (failure records)",
    "MYSPROJ_REGISTRY": "image registry prefix (CI)",
    "MYSPROJ_KUBECONFIG": "kubeconfig secret (CI)",
    "MYSPROJ_S3_ACCESS_KEY_ID": "bucket credentials (CI secret)",
    "MYSPROJ_S3_SECRET_ACCESS_KEY": "bucket credentials (CI secret)",
    "MYSPROJ_FETCH_CACHE": "where stage commands keep origins they fetch (mysproj/stages/fetch.py)",
    "MYSPROJ_FETCH_RETRY_SECONDS": "how long one download request may keep failing (mysproj/sources)",
    "MYSPROJ_GITHUB_URL": "GitHub's web address for github:// origins: a mirror (mysproj/sources/github.py)",
    "MYSPROJ_GITHUB_API_URL": "GitHub's API address for github:// origins: a mirror (mysproj/sources/github.py)",
    "MYSPROJ_IMAGE": "the image a stage runs in, as an MLflow tag (mysproj/tracking)",
    "MYSPROJ_S3_CONNECTIONS": "concurrent connections of one S3 transfer (mysproj/storage/s3_transfer.py)",
    "MYSPROJ_S3_PART_MIB": "part size of S3 ranged reads, multipart uploads and part digests (storage)",
}
_CONFIG_CLASSES: set[type] = set()  # every config class this process has built flags or configs for
_WARNED_ENV: set[str] = set()


class ConfigError(BadInput):
    pass


def opt(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, hashed: bool = True, input: bool = False,
        holds_out: bool = False, fetch: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field. `hashed=False` marks operational knobs (log interval, workers) that do not change
    the stage's result and so must not invalidate a finished output. `input=True` marks a URI (or list of URIs)
    the stage reads: a finished output counts as complete only while those inputs hold the same content; its
    spelling is not part of the config hash (`config_hash`). `holds_out=True`: an input folder that may hold the
    stage's own output (report's run roots); any other input and the output must not overlap. `fetch` (an
    input's): what a remote origin named there holds (a `FetchConfig.content`), so it is fetched first."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "hashed": hashed, "input": input,
            "holds_out": holds_out, "fetch": fetch}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp, value: Any) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field '{name}' is required (got no value)")
    origin = typing.get_origin(base)
    try:
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(name, item_tp, v) for v in value]
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # NaN passes every range check; inf is no learning rate either
                raise ConfigError(f"config field '{name}' = {value!r}: expected a finite number")
            return number
        if base is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"config field '{name}' = {value!r}: expected {_type_name(tp)}") from None
    return value


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    if typing.get_origin(base) in (list, tuple):
        name = f"a comma-separated list of {getattr(typing.get_args(base)[0], '__name__', 'str')}"
    elif base is dict or typing.get_origin(base) is dict:
        name = "a mapping (JSON object)"
    return f"{name} or none" if optional else name


def field_fetch_content(cfg, name: str) -> str | None:
    """What an origin URI given for input field `name` holds (`opt(fetch=...)`), or None where none is accepted."""
    return next(f.metadata.get("fetch") for f in dataclasses.fields(cfg) if f.name == name)


def validate(cfg) -> None:
    """Range/choice checks from field metadata; the dataclass may add cross-field checks in `check()`."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        m = f.metadata
        items = v if isinstance(v, list) else [v]
        for item in items:
            if item is None:
                continue
            if isinstance(item, str) and has_uri_credentials(item):
                raise ConfigError(f"config field '{f.name}' = {redact(item)!r}: credentials inside a URI are "
                                  f"refused; give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the "
                                  f"chart's credentials Secret)")
            if m.get("choices") and item not in m["choices"]:
                allowed = ", ".join(map(str, m["choices"]))
                raise ConfigError(f"config field '{f.name}' = {item!r}: must be one of {allowed}")
            if m.get("min") is not None and isinstance(item, (int, float)) and item < m["min"]:
                raise ConfigError(f"config field '{f.name}' = {item!r}: must be >= {m['min']}")
            if m.get("max") is not None and isinstance(item, (int, float)) and item > m["max"]:
                raise ConfigError(f"config field '{f.name}' = {item!r}: must be <= {m['max']}")
    check = getattr(cfg, "check", None)
    if check:
        check()


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def register_config_classes(*classes: type) -> None:
    """Make every field of `classes` a known variable for `warn_unknown_env` (config.stages registers every stage's
    config when the config package is imported, so they are known whichever one is being loaded)."""
    _CONFIG_CLASSES.update(classes)


def warn_unknown_env(env: typing.Mapping[str, str]) -> None:
    """Warn once per process about each MYSPROJ_* variable that is neither a field of any config class nor in
    NON_FIELD_ENV, naming the closest known name: a misspelt variable would otherwise be ignored silently."""
    known = set(NON_FIELD_ENV)
    for cls in _CONFIG_CLASSES:
        known.update(env_name(f.name) for f in dataclasses.fields(cls))
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and name not in _WARNED_ENV:
            _WARNED_ENV.add(name)
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("%s is set but is not a config field of any stage (ignored)%s", name, hint)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One CLI flag per field; values stay strings here and are coerced by `load_config`."""
    _CONFIG_CLASSES.add(cls)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        if base is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                                help=help_text + f" [env {env_name(f.name)}]")


def load_config(cls, *, yaml_file: str | None = None, cli: dict[str, Any] | None = None,
                env: typing.Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None):
    """Build and validate `cls` from default < YAML < env < overrides < CLI. One rule for the environment, the
    same for every command: `MYSPROJ_<FIELD>` variables count only where a command's face passes `env=os.environ`
    (a stage command, a Job's entry point, `mysproj run` for the pipeline's own fields); without `env` nothing is
    read from the process environment, so a DAG node's or a benchmark's config is exactly what it is given."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    raw: dict[str, Any] = {}
    if yaml_file:
        raw.update(_read_yaml(yaml_file, names, cls.__name__))
    env = {} if env is None else env
    _CONFIG_CLASSES.add(cls)
    warn_unknown_env(env)
    for name in names:
        if env_name(name) in env:
            raw[name] = env[env_name(name)]
    for source in (overrides or {}), (cli or {}):
        for k, v in source.items():
            if v is None:
                continue
            if k not in names:
                raise ConfigError(f"unknown config field '{k}' for {cls.__name__}; known: {', '.join(sorted(names))}")
            raw[k] = v
    kwargs = {k: _coerce(k, hints[k], v) for k, v in raw.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config field '{missing[0]}' is required: pass {flag_name(missing[0])} "
                          f"or set {env_name(missing[0])}")
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def _read_yaml(path: str, names: set[str], cls_name: str) -> dict[str, Any]:
    data = load_yaml(read_text(path), path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of field: value at the top level")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"config file {path}: key {odd[0]!r} is not a field name; keys are field names (text)")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config file {path}: unknown field '{unknown[0]}' for {cls_name}"
                          f"{closest(unknown[0], names)}")
    return data


def closest(name: str, known: typing.Iterable[str]) -> str:
    """'; did you mean X?' for the known name closest to `name`, else ''."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _no_alias_loader():
    """`yaml.SafeLoader` without aliases: a few bytes of `&a [*b, *b, ...]` expand to gigabytes (a "billion
    laughs"), and no config of this project needs one."""

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"YAML aliases (*{event.anchor}) are not accepted in config files; write the value "
                                f"out", event.start_mark)
            return super().compose_node(parent, index)

    return Loader


def load_yaml(text: str, path: str, error=None):
    """`text` of config file `path` parsed safely (no aliases); one `error` (default `ConfigError`) line otherwise."""

    error = error or ConfigError
    try:
        return yaml.load(text, Loader=_no_alias_loader())  # nosec B506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        what = getattr(e, "problem", None) or type(e).__name__
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"config file {path}: not valid YAML{where}: {what}; fix it") from None


def read_values(path) -> dict:
    """A Helm values file of the chart (a path or a storage URI) as a mapping."""

    values = load_yaml(read_text(str(path)), str(path), BadInput) or {}
    if not isinstance(values, dict):
        raise BadInput(f"{path}: a values file must be a YAML mapping")
    return values

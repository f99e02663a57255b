"""Configuration: YAML files layered over each other, then environment overrides.

One loader for every entry point (both jobs, the tools, the local-service scripts), so an
operator sets a value once and every part of the product sees the same one.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "default.yaml"
ENV_PREFIX = "RECO__"
ENV_FILES = "RECO_CONFIG"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as it is."""


class Config(dict):
    """A nested dict with dotted look-ups: ``cfg.get_path("kafka.topics.transactions")``."""

    def get_path(self, dotted: str, default: Any = ...) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is ...:
                    raise ConfigError(f"missing configuration value {dotted!r}: set it in a config "
                                      f"file or as {ENV_PREFIX}{dotted.upper().replace('.', '__')}")
                return default
            node = node[part]
        return node

    def path(self, dotted: str) -> Path:
        """A filesystem path value: ``{run_dir}`` filled in, relative paths from the repository root."""
        return resolve_path(self.text(dotted))

    def text(self, dotted: str) -> str:
        """A string value with ``{run_dir}`` filled in (for paths that may also be URIs)."""
        value = str(self.get_path(dotted))
        if "{run_dir}" in value:
            value = value.replace("{run_dir}", str(resolve_path(str(self.get_path("run_dir")))))
        return value

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys set, e.g. ``{"kafka.bootstrap_servers": "b:9092"}``."""
        merged = Config(copy.deepcopy(dict(self)))
        for dotted, value in overrides.items():
            _set_path(merged, dotted.split("."), value)
        return merged


def resolve_path(value: str | Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


# Mappings whose keys are free (passed on as they are): anything under them is a valid setting.
OPEN_MAPPINGS = ("spark.extra_conf", "kafka.client_options", "kafka.local.sasl_users", "data.options",
                 "data.columns", "data.files", "batch.grid")
# Names whose values are never printed (``redacted``), matched anywhere in a dotted key.
SECRET_NAMES = re.compile(r"password|secret|jaas|token|credential|private_key|sasl_users", re.I)
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_config(files: list[str | Path] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then each file in ``files`` (or ``$RECO_CONFIG``), then ``RECO__*`` variables.

    Every key a file or variable sets must exist in config/default.yaml (or sit under one of the
    ``OPEN_MAPPINGS``): a misspelt key is refused with the nearest valid one, never ignored.
    ``${NAME}`` in a value is replaced by the environment variable NAME (for secrets).
    """
    env = os.environ if env is None else env
    if files is None:
        files = [f for f in env.get(ENV_FILES, "").split(",") if f.strip()]
    merged: dict = _read_yaml(DEFAULT_CONFIG)
    known = set(_dotted_keys(merged))
    for path in files:
        layer = _read_yaml(Path(path))
        check_known_keys(_dotted_keys(layer), known, f"config file {path}")
        _deep_merge(merged, layer)
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__")]
            check_known_keys([".".join(keys)], known, f"environment variable {name}")
            _set_path(merged, keys, _parse_scalar(raw))
    return Config(_expand_placeholders(merged, env))


def known_keys() -> set[str]:
    """Every setting config/default.yaml defines, as dotted keys."""
    return set(_dotted_keys(_read_yaml(DEFAULT_CONFIG)))


def check_known_keys(keys, known: set[str], origin: str) -> None:
    """ConfigError for the first of ``keys`` (dotted) that names no setting, with the nearest one."""
    for key in keys:
        if key in known or any(key == m or key.startswith(m + ".") for m in OPEN_MAPPINGS):
            continue
        if any(k.startswith(key + ".") for k in known):
            continue                     # a whole section, e.g. a preset's "data"
        nearest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else " (see config/default.yaml)"
        raise ConfigError(f"{origin}: there is no setting {key!r}{hint}")


def redacted(value: Any, key: str = "") -> Any:
    """A copy of a config (or part of one) safe to print: secret values replaced."""
    if SECRET_NAMES.search(key) and value not in (None, {}, ""):
        return "<redacted>"
    if isinstance(value, Mapping):
        return {k: redacted(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    return value


def config_text(cfg: Mapping) -> str:
    """The effective config as YAML, secrets redacted (the jobs' --print-config)."""
    return yaml.safe_dump(redacted(dict(cfg)), sort_keys=False, default_flow_style=False)


def _dotted_keys(tree: Mapping, prefix: str = "") -> list[str]:
    """Every leaf of a nested mapping as a dotted key (an empty mapping counts as a leaf)."""
    keys = []
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping) and value and dotted not in OPEN_MAPPINGS:
            keys.extend(_dotted_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _expand_placeholders(node: Any, env: Mapping[str, str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _expand_placeholders(v, env, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_placeholders(v, env, key) for v in node]
    if isinstance(node, str) and "${" in node:
        def value_of(match: re.Match) -> str:
            if match.group(1) not in env:
                raise ConfigError(f"{key} refers to ${{{match.group(1)}}}, which is not set in the environment")
            return env[match.group(1)]
        return _PLACEHOLDER.sub(value_of, node)
    return node


def _read_yaml(path: Path) -> dict:
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (check {ENV_FILES})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong and where (line, column), without the snippet of the line PyYAML quotes:
    the line may hold a password (e.g. kafka.client_options sasl.jaas.config)."""
    problem = getattr(err, "problem", None) or type(err).__name__
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _deep_merge(base: dict, extra: Mapping) -> dict:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _set_path(node: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _parse_scalar(raw: str) -> Any:
    """``"8"`` -> 8, ``"true"`` -> True, ``"[a, b]"`` -> list; anything unparseable stays a string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw

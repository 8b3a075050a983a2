"""Strict, typed stage configs: YAML in, `--set key.sub=value` overrides, unknown keys rejected.

Every stage config is a pydantic model deriving from `StrictConfig` (extra="forbid", frozen), so a
typo in a YAML file or an override is an error that names the offending key instead of a value
that silently never takes effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vitpose_core.errors import InvalidInputError

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ConfigError(InvalidInputError):
    """A config file or override does not fit its schema; the message names every bad key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=5e-4` -> (["optim", "lr"], 0.0005). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    if not raw.strip():
        return path, ""
    try:
        return path, strict_yaml_load(raw)
    except (yaml.YAMLError, ConfigError) as error:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(error)}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = _deep_copy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def format_validation_error(cls: type[BaseModel], error: ValidationError, source: str) -> str:
    lines = [f"invalid {cls.__name__} config ({source}):"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{where}'")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def build_config(cls: type[ConfigT], data: dict[str, Any] | None = None, overrides: list[str] | None = None,
                 source: str = "<dict>") -> ConfigT:
    merged = apply_overrides(data or {}, overrides)
    try:
        return cls.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(format_validation_error(cls, error, source)) from None


# A config is a few hundred nodes. Aliases may share a node many times over (a 564-byte "billion laughs"
# file expands to 10^9), and every later deep copy, validation or dump walks the expansion, so the
# expanded size is counted on the node graph (memoised, cheap) and bounded before anything is built.
MAX_YAML_EXPANDED_NODES = 100_000
MAX_CONFIG_BYTES = 1 << 20  # the largest shipped config is a few KB; parsing megabytes of YAML takes minutes


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader whose documents are checked (duplicate keys, alias expansion) before construction."""


def _yaml_problem(error: Exception) -> str:
    """One line from a (multi-line) PyYAML error: the problem and its line/column."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem or error.context}"
    return " ".join(str(error).split())


def _check_yaml_node(root: yaml.Node) -> None:
    """Duplicate mapping keys and alias expansion (size, recursion) of a composed YAML graph."""
    expanded: dict[int, int] = {}  # id(node) -> nodes it expands to
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in expanded:
            return expanded[id(node)]
        if id(node) in in_progress:
            raise ConfigError(f"line {node.start_mark.line + 1}: a recursive alias (a node containing itself)")
        in_progress.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise ConfigError(f"duplicate key {key.value!r} at line {key.start_mark.line + 1} "
                                          f"(first at line {seen[key.value]})")
                    seen[key.value] = key.start_mark.line + 1
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        in_progress.discard(id(node))
        expanded[id(node)] = total
        if total > MAX_YAML_EXPANDED_NODES:
            raise ConfigError(f"aliases expand to more than {MAX_YAML_EXPANDED_NODES} nodes "
                              f"(line {node.start_mark.line + 1}); write the values out instead")
        return total

    size(root)


def strict_yaml_load(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys, recursive aliases and alias bombs (ConfigError)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{len(text)} characters of YAML exceed the limit of {MAX_CONFIG_BYTES}")
    loader = _StrictYAMLLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node)
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes and constructs recursively: [[[[...]]]] thousands deep
        raise ConfigError("YAML nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, expected a YAML file")
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size} bytes; configs are limited to "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = strict_yaml_load(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None) -> ConfigT:
    """Load `cls` from a YAML file (optionally one top-level `section` of it) plus overrides."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    if section is not None:
        data = data.get(section) or {}
    return build_config(cls, data, overrides, source=str(path) if path else "<defaults>")


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


# keys that say where or how a run is observed or retried, not what it computes: left out of the hash, so
# a rerun under a new pipeline run (a new MLflow parent) or with more retries still resumes the same work
NOT_HASHED = frozenset({"tracking", "max_failures", "max_trial_failures", "max_concurrent_trials",
                        "wait_for_workers_s"})


def config_hash(data: Any) -> str:
    """The one identity of a config (a pydantic config or JSON-able data) that decides skip and resume.

    Stage records (`vitpose run` skips a stage whose hash and inputs match), Ray Train run names (a
    rerun of the same config resumes its checkpoints) and Tune experiment names (a rerun restores the
    sweep) all come from this function. Keys in `NOT_HASHED` are dropped at every depth.
    """
    import hashlib
    import json

    if isinstance(data, BaseModel):
        data = dump_config(data)
    return hashlib.sha256(json.dumps(_without(data, NOT_HASHED), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _without(data: Any, keys: frozenset[str]) -> Any:
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list | tuple):
        return [_without(v, keys) for v in data]
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it: mappings merge key by key, anything else replaces."""
    merged = _deep_copy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _deep_copy(value)
    return merged

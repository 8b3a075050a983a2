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

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override does not fit its schema; the message names every bad key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=5e-4` -> (["optim", "lr"], 0.0005). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


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


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
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

"""Validated stage configuration: one pydantic model per stage, unknown keys are errors.

Configs come from YAML files or CLI flags; both go through ``load_config`` so the same rules apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @classmethod
    def from_mapping(cls: type[C], data: Mapping[str, Any] | None, source: str = "config") -> C:
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"{source}: invalid {cls.__name__}: {problems}") from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, section: str | None = None) -> C:
        data = load_yaml(path)
        if section is not None:
            data = data.get(section) or {}
        return cls.from_mapping(data, source=f"{path}" + (f" [{section}]" if section else ""))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def yaml_section(path: str | Path, section: str) -> dict[str, Any]:
    """A stage's settings from a YAML file: its ``section`` when the file has one, else the whole file.

    So one file can hold every stage (``embed:``, ``train:``, ``score:`` ...) or just one stage's keys.
    """
    raw = load_yaml(path)
    if section in raw:
        value = raw[section] or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {type(value).__name__}")
        return dict(value)
    return raw


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URL."""
    from . import storage

    try:
        data = yaml.safe_load(storage.read_text(str(path)))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data

"""Load a typed YAML config: parse errors and validation errors are told apart and name the file."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """The base of every typed config and record: immutable, and an unknown field is an error
    (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and the rule."""


def describe(error: ValidationError) -> str:
    """One line per problem: `field.path: what was expected (got 'value')`."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_yaml(path: str | Path, schema: type[T]) -> T:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of fields, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw, context={"config_dir": path.parent})
    except ValidationError as e:
        raise ConfigError(f"{path} is invalid:\n{describe(e)}") from e

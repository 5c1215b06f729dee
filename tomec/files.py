"""Reading the files options may name: JSON schedules and saved state dicts (errors name the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from .errors import ConfigError

__all__ = ["read_json_option", "load_state_file"]


def read_json_option(value: Any, method: str, what: str) -> Any:
    """An option given as a path to a JSON file is read (errors name the file); others pass through."""
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{method}: {what} file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{method}: {path} is not JSON: {e}") from e


def load_state_file(path: Union[str, Path], what: str) -> Mapping[str, Any]:
    """A saved state dict (``torch.load``, weights only, on the CPU); a missing or unreadable file,
    or one holding something else, is a ConfigError that names ``what`` (e.g. "dtem: heads")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a config error
        raise ConfigError(f"{what}: cannot read {path}: {e}") from e
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state

"""Reading YAML configs: one loader for every command's `--config` and the workflow's sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file ({} when empty); ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def read_section(path: str | Path, section: str) -> dict:
    """One step's section of a workflow YAML ({} when absent)."""
    value = load_yaml(path).get(section) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: section {section!r} must be a mapping, got {type(value).__name__}")
    return value


def canonical_json(obj: Any) -> str:
    """One spelling of a JSON value (sorted keys, no spaces): what config hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

"""Run-settings files (``--config FILE``): shared config fields plus per-method ones, in JSON.

::

    {"description": "...",                       # optional, free text
     "config": {"benchmark": "wordnet20", ...},   # RunConfig fields for every method
     "methods": {"l2p": {"lr": 0.03}, "er": {}},  # the methods (in order) and their own fields
     "published": {...}, "notes": [...], "source": "..."}   # optional, for readers (recipes, sweeps)

Precedence, lowest first: the method's and benchmark's defaults, ``config``, ``methods[name]``, flags
given on the command line. The demo's settings (``sweeps/wordnet20_demo.json``, written by
``scripts/sweep.py``) and the paper recipes (``recipes/``) are such files.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

TOP_LEVEL_KEYS = ("description", "config", "methods", "published", "notes", "source")


def _check_fields(values: Any, where: str, path: Path) -> dict[str, Any]:
    from .config import RunConfig

    known = {f.name for f in fields(RunConfig)} - {"method"}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: {where} must be an object of config fields, got {values!r}"[:300])
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path}: {where} has unknown fields {unknown}; known: {sorted(known)}")
    return dict(values)


def load_settings(path: str | Path) -> dict[str, Any]:
    """Read and check a settings file: ``{"config": {...}, "methods": {name: {...}}, ...}`` (see module doc)."""
    from .config import METHODS

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config file {path}: cannot read it as JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a JSON object, got a {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}; known: {list(TOP_LEVEL_KEYS)}")
    config = _check_fields(data.get("config", {}), "'config'", path)
    methods = data.get("methods", {})
    if not isinstance(methods, dict):
        raise ValueError(f"config file {path}: 'methods' must map method names to config fields, got {methods!r}")
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"config file {path}: unknown method {name!r}; expected names from {list(METHODS)}")
    return {**data, "config": config,
            "methods": {name: _check_fields(v, f"methods[{name!r}]", path) for name, v in methods.items()}}

"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON, atomically (values JSON cannot hold are written as ``str``)."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

"""JSON files for the scaffold: read with errors that name the file, write atomically.

Every output of the scaffold is rewritten whole through a temp file and `os.replace`, so an
interrupted run leaves either the previous or the next complete version, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def load_json(path: str, default: Any = None) -> Any:
    """Parse `path`; return `default` when it does not exist (a fresh run)."""
    if not os.path.exists(path):
        if default is not None:
            return default
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` to `path` via a temp file in the same directory and `os.replace`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Ctrl-C during the write: drop the temp file, keep the previous version intact.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

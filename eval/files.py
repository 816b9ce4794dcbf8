"""Crash-safe files for evaluation outputs: atomic JSON writes (temp file + os.replace) and
append-only JSONL checkpoints that tolerate a torn last line after a kill."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then os.replace over `path`."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """All rows, one JSON object a line, written atomically as atomic_write_json does."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows, one JSON object a line, and fsync so a finished item survives a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a checkpoint; a torn line (the process died mid-write) is skipped, not fatal."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def read_json(path: str | Path, what: str = "file", error: type[Exception] | None = None) -> Any:
    """json.load with an error that names the file (FileNotFoundError / ValueError, or `error` for both)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise (error or FileNotFoundError)(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise (error or ValueError)(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None

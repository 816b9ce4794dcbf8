"""Crash-safe files for evaluation outputs: atomic JSON writes (temp file + os.replace) and
append-only JSONL checkpoints that tolerate a torn last line after a kill."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file; mkstemp's 0600 is changed to it


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None, so that the JSON written is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(strict_json(obj), ensure_ascii=False, allow_nan=False, **kw)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON to a temp file in the same directory, fsync, then os.replace over `path`."""
    atomic_write_text(path, dumps(obj, indent=1))


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """All rows, one JSON object a line, written atomically as atomic_write_json does."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def sweep_temp_files(folder: str | Path) -> int:
    """Remove the temp files that atomic writes killed mid-way left in `folder` (not below); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
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
            f.write(dumps(row) + "\n")
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

"""Stage 1's on-disk cache of selected thoughts (docs/method.md 3.2 step 1): one small JSON file per
(model, question, replica, article) key, written atomically, so concurrent runs need no lock: a reader sees
no file or a complete one, and two writers of one key both write valid entries (the last one wins)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from eval.files import atomic_write_json

log = logging.getLogger(__name__)


def cache_key(model: str, question: str, replica_idx: int, article: str) -> str:
    """model | question_replica | shake_128(article) hexdigest(10), lower-cased like the reference."""
    article_hash = hashlib.shake_128(article.encode("utf-8")).hexdigest(10)
    return f"{model.lower()}|{f'{question}_{replica_idx}'.lower()}|{article_hash}"


def _entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.json"


def cache_get(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The cached entry {z_star, new_answer, old_answer, question} for `key`, or None."""
    path = _entry_path(Path(cache_dir), key)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("bootstrap cache: unreadable entry %s (%s); regenerating it", path, e)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("z_star"), str):
        log.warning("bootstrap cache: %s does not hold key %r; regenerating it", path, key)
        return None
    return entry


def cache_put(cache_dir: str | Path, key: str, *, z_star: str, new_answer: str, old_answer: str,
              question: str) -> Path:
    path = _entry_path(Path(cache_dir), key)
    entry = {"key": key, "z_star": z_star, "new_answer": new_answer, "old_answer": old_answer, "question": question}
    atomic_write_json(path, entry)  # temp file + fsync + rename: readers never see a torn entry
    return path


def cached_replicas(cache_dir: str | Path, model: str, question: str, article: str,
                    replica_times: int) -> tuple[dict[int, str], list[int]]:
    """({replica: cached thought}, [replicas still to generate])."""
    found: dict[int, str] = {}
    missing: list[int] = []
    for r in range(replica_times):
        entry = cache_get(cache_dir, cache_key(model, question, r, article))
        if entry is None:
            missing.append(r)
        else:
            found[r] = entry["z_star"]
    return found, missing

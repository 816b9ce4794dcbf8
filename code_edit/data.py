"""Which cases a run edits, and in what order (docs/method.md 3.7, 6, 7.1).

Resolves dataset names (downloaded `*_causalenhanced.json` files pinned to a reference commit, or
the bundled MQuAKE-hard), filters and orders cases like the reference, groups batch edits, and turns
a case's `requested_rewrite` entries into EditRequests. Loading/validation is eval.mquake's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from eval.mquake import EXCLUDED_CASE_IDS, attach_articles, load_articles, load_mquake, target_str

log = logging.getLogger(__name__)

REFERENCE_REPO = "CrashBugger/CODE"
REFERENCE_COMMIT = "291cb3e6fbd6213e67b7acbef79a541759615900"
RAW_BASE_URL = "https://raw.githubusercontent.com"
DOWNLOADED = ("MQuAKE-CF-3k-v2", "MQuAKE-T")
_EVAL_DATA = Path(__file__).resolve().parent.parent / "eval" / "data"
BUNDLED = {"MQuAKE-hard": (_EVAL_DATA / "MQuAKE-hard.json", _EVAL_DATA / "MQuAKE-hard_articles_dev.json")}
DATASET_NAMES = DOWNLOADED + tuple(BUNDLED)
BATCH_EDIT_MAX_UNIQUE = 90  # reference GROUPED_BATCH_EDIT_MAX_UNIQUE_EDIT_KEYS


class DatasetError(RuntimeError):
    """A dataset that cannot be fetched, or a cached copy that fails its checksum."""


# ------------------------------------------------------------------------------------------------
# Resolution and download

def default_cache_root() -> Path:
    """$CODE_EDIT_CACHE, else ~/.cache/code-edit (datasets and the bootstrap cache live under it)."""
    env = os.environ.get("CODE_EDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "code-edit"


def dataset_url(name: str, base_url: str = RAW_BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{REFERENCE_REPO}/{REFERENCE_COMMIT}/CODE/datasets/{name}_causalenhanced.json"


def fetch_dataset(name: str, cache_root: str | Path | None = None, *, base_url: str = RAW_BASE_URL,
                  timeout: float = 120.0) -> Path:
    """Path of the cached `{name}_causalenhanced.json`, downloading it on first use.

    The file's sha256 is recorded in a sidecar `<file>.sha256` (sha256sum format) on first download
    and checked on every later use; a mismatch is an error, never a silent re-download.
    """
    if name not in DOWNLOADED:
        raise DatasetError(f"dataset {name!r} is not downloadable; downloadable: {', '.join(DOWNLOADED)}")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / "datasets" / REFERENCE_COMMIT[:12]
    target = folder / f"{name}_causalenhanced.json"
    sidecar = target.with_name(target.name + ".sha256")
    recorded = _read_sidecar(sidecar)

    if target.is_file():
        actual = _sha256_file(target)
        if recorded is None:
            log.warning("%s has no recorded checksum; recording sha256 %s now", target, actual)
            _write_sidecar(sidecar, actual, target.name)
        elif actual != recorded:
            raise DatasetError(
                f"{target}: sha256 {actual} does not match the one recorded at download ({recorded}, in "
                f"{sidecar}); the cached file is damaged or was edited. Delete it to download it again."
            )
        return target

    url = dataset_url(name, base_url)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        digest = _download(url, fd, timeout=timeout, name=name)
        _check_json_list(tmp, url)
        if recorded is not None and digest != recorded:
            raise DatasetError(
                f"{url}: downloaded sha256 {digest} differs from the one recorded earlier ({recorded}, in {sidecar})"
            )
        if recorded is None:
            _write_sidecar(sidecar, digest, target.name)
        os.replace(tmp, target)
        tmp = None
        log.info("downloaded %s (sha256 %s) to %s", url, digest, target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _download(url: str, fd: int, *, timeout: float, name: str) -> str:
    by_hand = (
        f"Download it by hand from {url} (or from github.com/{REFERENCE_REPO} at commit {REFERENCE_COMMIT}, "
        f"path CODE/datasets/{name}_causalenhanced.json) and pass it with --data_path /path/to/"
        f"{name}_causalenhanced.json"
    )
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        try:
            with requests.get(url, stream=True, timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise DatasetError(f"could not download {name}: HTTP {resp.status_code} from {url}. {by_hand}")
                # Content-Length counts encoded bytes; only comparable when the body is not compressed.
                encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
                expected = None if encoded else resp.headers.get("Content-Length")
                n = 0
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
        except requests.RequestException as e:
            raise DatasetError(f"could not download {name} from {url}: {type(e).__name__}: {e}. {by_hand}") from e
        if expected is not None and expected.isdigit() and int(expected) != n:
            raise DatasetError(f"could not download {name}: got {n} of {expected} bytes from {url}. {by_hand}")
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


def _check_json_list(path: str, url: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{url}: the downloaded file is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{url}: expected a JSON list of MQuAKE cases, got {type(data).__name__}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(path: Path) -> str | None:
    if not path.is_file():
        return None
    parts = path.read_text(encoding="utf-8").split()
    if not parts or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0]):
        raise DatasetError(f"{path}: not a sha256 record ('<64 hex digits>  <file name>'); delete it and the data file")
    return parts[0]


def _write_sidecar(path: Path, digest: str, filename: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {filename}\n", encoding="utf-8")
    os.replace(tmp, path)


def load_dataset(name: str, *, data_path: str | Path | None = None, cache_root: str | Path | None = None,
                 base_url: str = RAW_BASE_URL) -> list[dict]:
    """The cases of dataset `name`, validated, with the reference's exclusions applied.

    data_path: a local MQuAKE-format file used instead of the download / bundled copy.
    MQuAKE-hard gets articles from the bundled dev articles file where one exists.
    """
    if data_path is None and name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} (or give --data_path)")
    if data_path is not None:
        cases = load_mquake(data_path)
    elif name in BUNDLED:
        data_file, articles_file = BUNDLED[name]
        cases, missing = attach_articles(load_mquake(data_file), load_articles(articles_file))
        with_articles = sum(1 for c in cases if case_has_articles(c))
        log.info("%s: %d cases, %d with a causal article for every rewrite (%d rewrites without one)",
                 name, len(cases), with_articles, len(missing))
    else:
        cases = load_mquake(fetch_dataset(name, cache_root, base_url=base_url), require_articles=True)
    excluded = EXCLUDED_CASE_IDS.get(name, frozenset())
    kept = [c for c in cases if c["case_id"] not in excluded]
    if len(kept) != len(cases):
        log.info("%s: excluded case ids %s", name, sorted(excluded))
    return kept


def case_has_articles(case: dict) -> bool:
    return all(isinstance(r.get("article"), str) and r["article"].strip() for r in case["requested_rewrite"])


# ------------------------------------------------------------------------------------------------
# Ordering (docs/method.md 7.1)

def hop_count(case: dict) -> int:
    return len(case.get("new_single_hops", []))


def shuffle_by_hop(cases: list[dict], seed: int) -> tuple[list[dict], dict[int, list[dict]]]:
    """Group by hop count, shuffle each group, interleave round robin by ascending hop.

    Exactly the reference: groups are keyed in order of first appearance in `cases`, one RNG seeded
    with `seed` shuffles them in that order (so a group's order depends on the groups shuffled
    before it), then the result takes one case from each hop in ascending hop order, repeatedly,
    skipping exhausted groups.
    """
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(hop_count(case), []).append(case)
    rng = random.Random(seed)
    for hop in groups:
        rng.shuffle(groups[hop])
    hops = sorted(groups)
    longest = max((len(g) for g in groups.values()), default=0)
    interleaved = [groups[h][i] for i in range(longest) for h in hops if i < len(groups[h])]
    return interleaved, groups


def order_cases(cases: list[dict], *, seed: int = 70, hop: int | None = None, max_cases: int = 200,
                skip_cases: int = 0, batch_mode: bool = False) -> list[dict]:
    """shuffle (+ hop select) -> [:max_cases] (not in batch mode; <= 0 keeps all) -> [skip_cases:]."""
    interleaved, groups = shuffle_by_hop(cases, seed)
    if hop is None:
        selected = interleaved
    elif hop in groups:
        selected = groups[hop]
    else:
        raise DatasetError(f"no case has {hop} hops; hop counts present: {sorted(groups)}")
    if max_cases > 0 and not batch_mode:
        selected = selected[:max_cases]
    if skip_cases < 0:
        raise DatasetError(f"skip_cases must be >= 0, got {skip_cases}")
    if skip_cases and batch_mode:
        raise DatasetError("--skip_cases cannot be combined with --batch_edit")
    return selected[skip_cases:]


# ------------------------------------------------------------------------------------------------
# Batch editing (docs/method.md 3.7)

@dataclass(frozen=True)
class BatchGroup:
    group_id: int  # 1-based, like the reference
    requests: tuple[EditRequest, ...]  # the group's edits (each knows its case_id and rewrite index)
    edit_keys: tuple[tuple[str, str, str], ...]  # (subject, relation_id, target_new)
    cases: tuple[dict, ...]  # every case that contributed at least one edit, in order, once each


def edit_key(rewrite: dict, case_id: Any) -> tuple[str, str, str]:
    for f in ("subject", "relation_id", "target_new"):
        if rewrite.get(f) is None:
            raise DatasetError(f"case_id {case_id}: requested_rewrite needs {f!r} for batch editing")
    return rewrite["subject"], rewrite["relation_id"], target_str(rewrite["target_new"])


def batch_edit_groups(cases: list[dict], n: int, *, max_unique: int = BATCH_EDIT_MAX_UNIQUE) -> list[BatchGroup]:
    """Unique edits in case order (whole cases, until >= max_unique collected), cut to a multiple
    of n, split into groups of n. `cases` is the ordered, hop-filtered list (not max_cases-cut)."""
    if not 1 <= n <= max_unique:
        raise DatasetError(f"--batch_edit must be between 1 and {max_unique}, got {n}")
    records: list[tuple[tuple[str, str, str], int, dict]] = []  # (key, rewrite idx, case)
    seen: set[tuple[str, str, str]] = set()
    for case in cases:
        for r, rw in enumerate(case["requested_rewrite"]):
            key = edit_key(rw, case["case_id"])
            if key not in seen:
                seen.add(key)
                records.append((key, r, case))
        if len(records) >= max_unique:
            break
    usable = len(records) // n * n
    if usable == 0:
        raise DatasetError(f"only {len(records)} unique edits available; a batch of {n} needs at least {n}")
    if usable < len(records):
        log.info("batch edit: dropping %d trailing edits to fill groups of %d", len(records) - usable, n)
    groups = []
    for gid, start in enumerate(range(0, usable, n), start=1):
        chunk = records[start:start + n]
        contributing: dict[Any, dict] = {}
        for _, _, case in chunk:
            contributing.setdefault(case["case_id"], case)
        groups.append(BatchGroup(
            group_id=gid,
            requests=tuple(edit_requests(case)[r] for _, r, case in chunk),
            edit_keys=tuple(key for key, _, _ in chunk),
            cases=tuple(contributing.values()),
        ))
    return groups


# ------------------------------------------------------------------------------------------------
# Edit requests

@dataclass(frozen=True)
class EditRequest:
    """One requested rewrite, in the form the editor's stages use."""

    case_id: Any
    rewrite_idx: int
    subject: str
    prompt: str  # cloze template with "{}" for the subject
    question: str  # natural-language edit question
    old_answer: str
    new_answer: str
    article: str | None  # causal scaffold; None where the dataset has none
    relation_id: str | None = None
    rephrase_questions: tuple[str, ...] = ()  # CaKE rephrase_prompt[*].question
    learning_questions: tuple[str, ...] = ()  # CaKE learning_prompt[*].question

    @property
    def cloze(self) -> str:
        """The cloze question of the reference: template with the subject, a space and '?'."""
        return f"{self.prompt.replace('{}', self.subject, 1)} ?"

    @property
    def where(self) -> str:
        return f"case_id {self.case_id} requested_rewrite[{self.rewrite_idx}]"


def edit_requests(case: dict) -> list[EditRequest]:
    """EditRequests for every requested_rewrite of a (validated) MQuAKE case."""
    out = []
    for r, rw in enumerate(case["requested_rewrite"]):
        article = rw.get("article")
        out.append(EditRequest(
            case_id=case["case_id"], rewrite_idx=r, subject=rw["subject"], prompt=rw["prompt"],
            question=rw["question"], old_answer=target_str(rw["target_true"]),
            new_answer=target_str(rw["target_new"]),
            article=article if isinstance(article, str) and article.strip() else None,
            relation_id=rw.get("relation_id"),
            rephrase_questions=tuple(q["question"] for q in rw.get("rephrase_prompt", [])),
            learning_questions=tuple(q["question"] for q in rw.get("learning_prompt", [])),
        ))
    return out

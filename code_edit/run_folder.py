"""The run folder (docs/method.md 7.1): the units a run edits, its identity (the arguments, hparams and data
that must agree for a resume), choosing and locking it, the per-case journal and the outputs rebuilt from it.

`metrics.jsonl` (one fsynced line per finished case) is the run's source of truth; metrics.json and res.json
are rebuilt from it atomically after every unit, so a kill -9 loses at most the unit in flight and a rerun
never repeats or duplicates a finished case. Under torchrun each rank keeps its own journal
(metrics.rank{r}.jsonl), merged here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from code_edit.config import upgrade_hparams
from code_edit.data import EditRequest, batch_edit_groups, edit_requests
from code_edit.distributed import Ranks
from eval.files import append_jsonl, atomic_write_json, read_json, read_jsonl
from eval.probes import string_match_summary

log = logging.getLogger("code_edit")

# Arguments that change what a run computes: a run directory is resumed only when they all agree.
IDENTITY_KEYS = ("editing_method", "datatype", "model_type", "hparams_path", "max_cases", "hop", "shuffle_seed",
                 "exp_tag", "batch_edit", "skip_cases", "data_path", "model_path", "articles_only")
IDENTITY_DEFAULTS = {"articles_only": False}  # keys added later: a run folder written before has the default


class RunError(RuntimeError):
    """A run that cannot start or resume as asked (the message says why and what to do)."""


class UnitFailed(RunError):
    """A unit raised under --on_error stop: the run stopped there (run_info status "failed")."""


# ------------------------------------------------------------------------------------------------
# Units: what is edited together and evaluated after it

@dataclass(frozen=True)
class Unit:
    key: str  # "case-{id}" or "group-{n}": names the unit in metrics.jsonl, logs and saved adapters
    requests: tuple[EditRequest, ...]
    cases: tuple[dict, ...]
    group: int | None = None


def plan_units(cases: list[dict], batch_edit: int) -> list[Unit]:
    """Sequential mode: one unit per case (all its rewrites edited jointly). Batch mode: the groups
    of code_edit.data.batch_edit_groups, each evaluated on every case that contributed an edit."""
    if batch_edit > 0:
        return [Unit(f"group-{g.group_id}", g.requests, g.cases, g.group_id) for g in batch_edit_groups(cases, batch_edit)]
    return [Unit(f"case-{c['case_id']}", tuple(edit_requests(c)), (c,)) for c in cases]


def case_count(units: list[Unit]) -> int:
    return len({c["case_id"] for u in units for c in u.cases})


# ------------------------------------------------------------------------------------------------
# Run directory

def run_parent(output_root: str | Path, datatype: str, model_type: str, method: str, exp_tag: str) -> Path:
    return Path(output_root) / datatype / model_type / method / f"tag-{exp_tag}"


def run_dir_prefix(n_cases: int, batch_edit: int, seed: int) -> str:
    return f"n{n_cases}{f'_b{batch_edit}' if batch_edit > 0 else ''}_seed{seed}_"


def _identity(run_args: dict) -> dict:
    return {k: run_args.get(k, IDENTITY_DEFAULTS.get(k)) for k in IDENTITY_KEYS}


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} (run dir) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _read_meta(run_dir: Path) -> tuple[dict, dict] | None:
    try:
        return read_json(run_dir / "meta" / "run_args.json"), read_json(run_dir / "meta" / "run_info.json")
    except (FileNotFoundError, ValueError):
        return None


def data_hash(cases: list[dict]) -> str:
    """sha256 of the selected cases in run order, articles included: the data part of a run's identity."""
    blob = json.dumps(cases, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _journalled(d: Path) -> bool:
    """Whether any journal of the folder holds a finished unit."""
    return any(p.is_file() and p.stat().st_size > 0 for p in journal_paths(d))


def choose_run_dir(parent: Path, prefix: str, run_id: str | None, run_args: dict,
                   hparams: dict, content: str | None = None) -> tuple[Path, bool]:
    """(run directory, resuming?).

    --run_id given: that directory; resumed if it exists (its arguments, hparams and data must match).
    A folder whose meta files were never completed (a kill while it was created) and that holds no
    finished unit is started again. --run_id not given: the newest unfinished directory under `parent`
    with the same name prefix, arguments, hparams and data is resumed; otherwise a new one named by the
    current time.
    """
    if run_id:
        d = parent / f"{prefix}{run_id}"
        meta = _read_meta(d)
        if meta is None:
            if d.exists() and _journalled(d):
                raise RunError(f"{d} holds finished cases but no readable meta/run_args.json and meta/run_info.json; "
                               "choose another --run_id")
            return d, False
        diff = _differences(_identity(meta[0]), _identity(run_args))
        if upgrade_hparams(meta[1].get("hparams") or {}) != hparams:
            diff.append("hparams differ from meta/run_info.json")
        old = (meta[1].get("dataset") or {}).get("content_sha256")
        if content and old and old != content:
            raise RunError(f"{d}: the selected cases changed since the run started (data sha256 {old[:12]} in "
                           f"meta/run_info.json, {content[:12]} now; did --data_path's file change?); start a new run "
                           "with another --run_id, or restore the data")
        if diff:
            raise RunError(f"{d} was started with other settings; resume it with the same command, or pick "
                           f"another --run_id. Differences: " + "; ".join(diff))
        return d, True
    candidates = []
    for d in parent.glob(f"{prefix}*") if parent.is_dir() else []:
        meta = _read_meta(d)
        if meta is None or meta[1].get("status") == "finished":
            continue
        same_data = (meta[1].get("dataset") or {}).get("content_sha256") in (None, content)
        same_hparams = upgrade_hparams(meta[1].get("hparams") or {}) == hparams
        if _identity(meta[0]) == _identity(run_args) and same_hparams and same_data:
            candidates.append((d.stat().st_mtime, d.name, d))
    if candidates:
        return max(candidates)[2], True
    return parent / f"{prefix}{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}", False


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One process per run directory: a second one would redo the same cases."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run_dir} is in use by another process (lock file {run_dir / '.lock'})") from None
        yield
    finally:
        f.close()


# ------------------------------------------------------------------------------------------------
# metrics.jsonl: the per-case journal

class Journal:
    """metrics.jsonl rows {"unit", "case_id", "record"}; appended with fsync after each unit. One
    process writes metrics.jsonl; under torchrun rank r writes metrics.rank{r}.jsonl."""

    def __init__(self, run_dir: Path, name: str = "metrics.jsonl"):
        self.path = run_dir / name

    def repair(self) -> int:
        """Cut a torn last line (the process died mid-write) so the next append starts on a fresh
        line; returns the bytes dropped."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(data) - keep

    def rows(self) -> dict[tuple[str, Any], dict]:
        """(unit, case_id) -> record; a later row replaces an earlier one (a unit redone after a kill)."""
        out = {}
        for row in read_jsonl(self.path):
            if isinstance(row.get("unit"), str) and isinstance(row.get("record"), dict):
                out[(row["unit"], row.get("case_id"))] = row["record"]
        return out

    def append(self, unit: Unit, records: list[dict]) -> None:
        append_jsonl(self.path, [{"unit": unit.key, "case_id": r["case_id"], "record": r} for r in records])


def journal_name(ranks: Ranks) -> str:
    return "metrics.jsonl" if ranks.world == 1 else f"metrics.rank{ranks.rank}.jsonl"


def journal_paths(run_dir: Path) -> list[Path]:
    """metrics.jsonl, then metrics.rank{r}.jsonl by rank: every journal any launch of this run wrote."""
    ranked = [(int(m.group(1)), q) for q in run_dir.glob("metrics.rank*.jsonl")
              if (m := re.fullmatch(r"metrics\.rank(\d+)\.jsonl", q.name))]
    return [run_dir / "metrics.jsonl", *(q for _, q in sorted(ranked))]


def journal_rows(run_dir: Path, units: list[Unit]) -> dict[tuple[str, Any], dict]:
    """(unit, case_id) -> record merged over every journal. A unit's records all come from one journal
    that holds it complete (the last such in journal_paths order), never a mix of two attempts; units
    complete nowhere are left out (they are still to do)."""
    rows: dict[tuple[str, Any], dict] = {}
    for path in journal_paths(run_dir):
        part = Journal(path.parent, path.name).rows()
        for u in units:
            keys = [(u.key, c["case_id"]) for c in u.cases]
            if all(k in part for k in keys):
                rows.update((k, part[k]) for k in keys)
    return rows


def done_units(units: list[Unit], rows: dict) -> set[str]:
    return {u.key for u in units if all((u.key, c["case_id"]) in rows for c in u.cases)}


def rebuild_outputs(run_dir: Path, units: list[Unit], rows: dict) -> list[dict]:
    """metrics.json (records of finished units, in run order) and res.json, both atomic."""
    done = done_units(units, rows)
    records = [rows[(u.key, c["case_id"])] for u in units if u.key in done for c in u.cases]
    atomic_write_json(run_dir / "metrics.json", records)
    atomic_write_json(run_dir / "res.json", string_match_summary(records))
    return records


def carry_stop(info: dict) -> dict:
    """On resume: an earlier stop's keys (error, failed_at, interrupted_at) move to `previous_stops`, so a
    run that goes on to finish does not still read as failed."""
    stop = {k: info.pop(k) for k in ("error", "failed_at", "interrupted_at") if k in info}
    if stop:
        info.setdefault("previous_stops", []).append({"status": info.get("status"), **stop})
    return info


def record_stop(run_dir: Path, info: dict, e: BaseException) -> None:
    """A run that stops before its end says so in run_info.json and run.log: status "interrupted" (Ctrl-C)
    or "failed" with the error."""
    if isinstance(e, KeyboardInterrupt):
        info.update(status="interrupted", interrupted_at=dt.datetime.now().isoformat(timespec="seconds"))
        log.warning("interrupted; rerun the same command to resume")
    else:
        info.update(status="failed", error=f"{type(e).__name__}: {e}",
                    failed_at=dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(run_dir / "meta" / "run_info.json", info)

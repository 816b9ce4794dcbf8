"""One editing run end to end: pick cases, lay out the run directory (docs/method.md 7.1), edit and
evaluate unit by unit with a progress bar, and resume after a crash.

`metrics.jsonl` (one fsynced line per finished case) is the run's source of truth; metrics.json and
res.json are rebuilt from it atomically after every unit, so a kill -9 loses at most the unit in
flight and a rerun never repeats or duplicates a finished case. Under torchrun each rank edits a
round-robin share of the units left and keeps its own journal (metrics.rank{r}.jsonl); rank 0 plans,
owns the run directory and merges every journal (code_edit.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from code_edit.config import CausalEditConfig, load_hparams
from code_edit.data import (BATCH_EDIT_MAX_UNIQUE, EditRequest, batch_edit_groups, case_has_articles,
                            default_cache_root, edit_requests, load_dataset, order_cases)
from code_edit.distributed import Ranks, rank_device, run_ranks, shard
from code_edit.editor import Editor, Reporter, needs_articles, normalize_method
from eval.files import append_jsonl, atomic_write_json, read_json, read_jsonl, sweep_temp_files
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
        if meta[1].get("hparams") != hparams:
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
        if _identity(meta[0]) == _identity(run_args) and meta[1].get("hparams") == hparams and same_data:
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


# ------------------------------------------------------------------------------------------------
# Progress

class BarReporter(Reporter):
    """tqdm bar: units done / total with ETA; postfix = current unit, stage and tokens/s of the stage."""

    def __init__(self, bar: Any):
        self.bar, self.unit, self.name = bar, "", ""
        self.t0, self.n = time.perf_counter(), 0

    def start_unit(self, key: str) -> None:
        self.unit = key

    def stage(self, name: str) -> None:
        self.name, self.t0, self.n = name.split(":")[0], time.perf_counter(), 0
        self._show()

    def tokens(self, n: int) -> None:
        self.n += n
        self._show()

    def _show(self) -> None:
        rate = self.n / max(time.perf_counter() - self.t0, 1e-6)
        self.bar.set_postfix_str(f"{self.unit} {self.name} {rate:,.0f} tok/s", refresh=True)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def run_logging(run_dir: Path, ranks: Ranks = Ranks()) -> Iterator[None]:
    """INFO and up to run.log (rank r > 0 of several: run.rank{r}.log), warnings also on stderr."""
    name = "run.log" if ranks.rank == 0 else f"run.rank{ranks.rank}.log"
    tag = f"[rank {ranks.rank}] " if ranks.world > 1 else ""
    fh = logging.FileHandler(run_dir / name, encoding="utf-8")
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ch = _TqdmHandler()
    ch.setLevel(logging.WARNING)
    ch.setFormatter(logging.Formatter(tag + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (fh, ch):
        root.addHandler(h)
    try:
        yield
    finally:
        for h in (fh, ch):
            root.removeHandler(h)
            h.close()


# ------------------------------------------------------------------------------------------------
# The run

@dataclass
class Prepared:
    cfg: CausalEditConfig
    method: str
    model_type: str
    exp_tag: str
    units: list[Unit]
    dataset: dict


def check_args(args: Any) -> None:
    """The command line's numbers, device and output folder, checked before anything is loaded."""
    if not 0 <= args.batch_edit <= BATCH_EDIT_MAX_UNIQUE:
        raise RunError(f"--batch_edit {args.batch_edit}: must be 0 (sequential) or 1..{BATCH_EDIT_MAX_UNIQUE}")
    if args.skip_cases < 0:
        raise RunError(f"--skip_cases {args.skip_cases}: must be >= 0")
    if args.hop is not None and args.hop < 1:
        raise RunError(f"--hop {args.hop}: must be >= 1 (the number of hops of the cases to keep)")
    out = Path(args.output_root)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise RunError(f"--output_root {args.output_root}: {p} is a file, not a folder")
            break
    if args.device is not None:
        check_device(args.device)


def check_device(device: str) -> None:
    """--device cpu | cuda | cuda:N, and a CUDA device must exist."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise RunError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RunError(f"--device {device}: no CUDA GPU is visible to PyTorch here (use --device cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise RunError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def prepare(args: Any) -> Prepared:
    """Config, method and the ordered units, before anything is written or loaded."""
    check_args(args)
    if not args.model_type and not args.hparams_path:
        raise RunError("give --model_type (a preset: see code_edit/hparams/) or --hparams_path FILE.toml")
    cfg = load_hparams(args.hparams_path or args.model_type)
    method = normalize_method(args.editing_method)
    model_type = args.model_type or cfg.name
    exp_tag = args.exp_tag or (f"T{int(cfg.teacher_use_sft)}_S{int(cfg.student_use_sft)}"
                               if method == "CausalEdit" else "default")
    cases = load_dataset(args.datatype, data_path=args.data_path)
    info = {"name": args.datatype, "data_path": args.data_path, "cases_loaded": len(cases)}
    only_articles = needs_articles(method, cfg) or getattr(args, "articles_only", False)
    if only_articles:
        why = "reads the causal articles" if needs_articles(method, cfg) else "runs with --articles_only"
        kept = [c for c in cases if case_has_articles(c)]
        if len(kept) < len(cases):
            log.warning("%s: %s %s; kept %d of %d cases that have one for every rewrite",
                        args.datatype, method, why, len(kept), len(cases))
        if not kept:
            raise RunError(f"{args.datatype}: no case has an article for every rewrite; {method} {why} "
                           "(generate them with python -m scaffold)")
        cases = kept
    info["cases_with_articles_kept"] = len(cases) if only_articles else None
    ordered = order_cases(cases, seed=args.shuffle_seed, hop=args.hop, max_cases=args.max_cases,
                          skip_cases=args.skip_cases, batch_mode=args.batch_edit > 0)
    if not ordered:
        raise RunError("no case left to edit after --hop / --max_cases / --skip_cases")
    units = plan_units(ordered, args.batch_edit)
    info["cases_selected"] = case_count(units)
    info["content_sha256"] = data_hash(ordered)
    return Prepared(cfg, method, model_type, exp_tag, units, info)


def device_name(device: Any) -> str:
    """The accelerator's name for the record ("NVIDIA H200"), or "cpu"."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _requests_json(units: list[Unit]) -> list[dict]:
    return [{"unit": u.key, "group": u.group, "case_ids": [c["case_id"] for c in u.cases],
             "requests": [dataclasses.asdict(r) for r in u.requests]} for u in units]


def planned_dir(args: Any, p: Prepared) -> tuple[Path, str]:
    """(parent folder, run folder name prefix) of the run the arguments describe; the run id follows."""
    parent = run_parent(args.output_root, args.datatype, p.model_type, p.method, p.exp_tag)
    return parent, run_dir_prefix(case_count(p.units), args.batch_edit, args.shuffle_seed)


@dataclass
class Start:
    """What rank 0 tells the other ranks once the run directory is ready."""
    p: Prepared
    run_dir: Path
    todo: list[str]  # keys of the units still to do, in run order


def execute(args: Any, *, editor_factory: Any = None) -> Path:
    """Run (or resume) the editing run the arguments describe; returns its directory.

    Under torchrun (WORLD_SIZE > 1) rank 0 plans, opens the run directory (lock, meta, journal repair)
    and sends the plan and the units still to do to the others; every rank edits its round-robin
    share into its own journal; when all are done rank 0 merges the journals into metrics.json and
    res.json. One process does all of it alone.
    """
    with run_ranks() as ranks, contextlib.ExitStack() as stack:
        if ranks.rank == 0:
            try:
                start, info = _open_run(args, ranks, stack)
            except Exception as e:
                ranks.broadcast(f"{type(e).__name__}: {e}")  # the others stop too, with the reason
                raise
            ranks.broadcast(start)
            problem = None
        else:
            start, info = ranks.broadcast(), {}
            if isinstance(start, str):
                raise RunError(f"rank 0 could not start the run: {start}")
            problem = None if (start.run_dir / "requests.json").exists() else (
                f"cannot see {start.run_dir / 'requests.json'}, written by rank 0: --output_root must be on a "
                f"filesystem that every host shares")
            if problem is None:
                stack.enter_context(run_logging(start.run_dir, ranks))
        problems = [f"rank {r}: {m}" for r, m in enumerate(ranks.gather(problem)) if m]
        if problems:
            raise RunError("; ".join(problems))
        p, run_dir = start.p, start.run_dir
        todo = set(start.todo)
        mine = shard([u for u in p.units if u.key in todo], ranks.rank, ranks.world)
        try:
            failures = _edit_units(args, p, run_dir, mine, ranks, info, editor_factory)
        except BaseException as e:
            if ranks.rank == 0:
                _record_stop(run_dir, info, e)
            raise
        failures = sum(ranks.gather(failures))  # waits for every rank
        if ranks.rank == 0:
            if failures:
                info["status"] = "incomplete"
                atomic_write_json(run_dir / "meta" / "run_info.json", info)
                print(f"{failures} unit(s) failed (see {run_dir / 'failures.jsonl'}); rerun the same command to retry "
                      "them", file=sys.stderr)
            _finish(run_dir, p.units, info, complete=not failures)
        return run_dir


def _record_stop(run_dir: Path, info: dict, e: BaseException) -> None:
    """A run that stops before its end says so in run_info.json and run.log: status "interrupted" (Ctrl-C)
    or "failed" with the error."""
    if isinstance(e, KeyboardInterrupt):
        info.update(status="interrupted", interrupted_at=dt.datetime.now().isoformat(timespec="seconds"))
        log.warning("interrupted; rerun the same command to resume")
    else:
        info.update(status="failed", error=f"{type(e).__name__}: {e}",
                    failed_at=dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(run_dir / "meta" / "run_info.json", info)


def _open_run(args: Any, ranks: Ranks, stack: contextlib.ExitStack) -> tuple[Start, dict]:
    """Rank 0 (or the only process): plan, choose and lock the run directory, write or check its
    meta files, repair the journals; returns the start message and run_info."""
    p = prepare(args)
    cfg, units = p.cfg, p.units
    run_args = {k: v for k, v in vars(args).items() if k != "cmd"}
    run_args.update(editing_method=p.method, model_type=p.model_type, exp_tag=p.exp_tag)
    parent, prefix = planned_dir(args, p)
    hparams = json.loads(json.dumps(cfg.to_dict()))  # as stored in run_info.json (tuples become lists)
    run_dir, resuming = choose_run_dir(parent, prefix, args.run_id, run_args, hparams, p.dataset["content_sha256"])
    run_args["run_id"] = run_dir.name[len(prefix):]
    stack.enter_context(locked(run_dir))  # held by rank 0 until every rank is done
    stack.enter_context(run_logging(run_dir, ranks))
    meta = run_dir / "meta"
    swept = sum(sweep_temp_files(f) for f in (run_dir, meta) if f.is_dir())
    if swept:
        log.info("removed %d temp file(s) an interrupted write left behind", swept)
    planned = _requests_json(units)
    if resuming:
        old = read_json(run_dir / "requests.json", "requests.json") if (run_dir / "requests.json").exists() else None
        if old is not None and [u["unit"] for u in old] != [u["unit"] for u in planned]:
            raise RunError(f"{run_dir}: the planned cases differ from its requests.json (did the dataset file change?); "
                           "start a new run with another --run_id")
        info = read_json(meta / "run_info.json", "run_info.json")
        info.setdefault("dataset", {}).setdefault("content_sha256", p.dataset["content_sha256"])  # older runs
        for path in journal_paths(run_dir):  # before any rank appends again
            dropped = Journal(path.parent, path.name).repair()
            if dropped:
                log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path.name, dropped)
    else:
        info = {"hparams": hparams, "hparams_name": cfg.name, "method": p.method,
                "model_source": args.model_path or cfg.model.source, "dtype": cfg.model.dtype,
                "eval_generation": dataclasses.asdict(cfg.eval), "dataset": p.dataset,
                "started_at": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit(),
                "python": platform.python_version(), "units_total": len(units), "status": "running"}
        atomic_write_json(meta / "run_args.json", run_args)
        atomic_write_json(run_dir / "requests.json", planned)
    rows = journal_rows(run_dir, units)
    done = done_units(units, rows)
    rebuild_outputs(run_dir, units, rows)
    todo = [u for u in units if u.key not in done]
    info.update(status="running" if todo else "finished", units_done=len(done), world_size=ranks.world, resumed_at=(
        dt.datetime.now().isoformat(timespec="seconds") if resuming else None))
    atomic_write_json(meta / "run_info.json", info)
    print(f"run dir: {run_dir}", file=sys.stderr)
    procs = f", {ranks.world} processes" if ranks.world > 1 else ""
    msg = (f"resuming: {len(done)}/{len(units)} units finished, {len(todo)} to go{procs}" if resuming else
           f"new run: {len(units)} units ({case_count(units)} cases), method {p.method}, preset {cfg.name}{procs}")
    print(msg, file=sys.stderr)
    log.info("%s; %s", run_dir, msg)
    return Start(p, run_dir, [u.key for u in todo]), info


def _edit_units(args: Any, p: Prepared, run_dir: Path, mine: list[Unit], ranks: Ranks, info: dict,
                editor_factory: Any) -> int:
    """Edit and evaluate this rank's units into its journal; returns how many failed (--on_error skip).
    Rank 0 also rebuilds metrics.json / res.json from every journal after each of its units and shows
    the bar (all ranks' progress, refreshed at rank 0's unit ends); the other ranks only log."""
    if not mine:
        return 0
    units = p.units
    editor = (editor_factory or load_editor)(args, p, run_dir)
    if ranks.rank == 0:
        info.update(device=str(editor.device), model_dtype=str(editor.model.lm_head.weight.dtype).removeprefix("torch."),
                    device_name=device_name(editor.device))
        atomic_write_json(run_dir / "meta" / "run_info.json", info)
    journal = Journal(run_dir, journal_name(ranks))
    from tqdm import tqdm

    failures = 0
    with tqdm(total=len(units), initial=info.get("units_done", 0), unit="group" if args.batch_edit > 0 else "case",
              dynamic_ncols=True, file=sys.stderr, disable=ranks.rank != 0) as bar:
        reporter = BarReporter(bar)
        editor.reporter = reporter
        for unit in mine:
            reporter.start_unit(unit.key)
            try:
                records = editor.run_unit(unit.key, unit.requests, unit.cases, group=unit.group)
            except Exception as e:
                # The traceback goes to run.log only (INFO); stderr gets the one line.
                log.info("%s traceback:\n%s", unit.key, traceback.format_exc())
                if getattr(args, "on_error", "stop") != "skip":
                    log.error("%s failed: %s: %s (the run stopped; fix the cause and rerun the same command to "
                              "resume, or pass --on_error skip to go on without it)", unit.key, type(e).__name__, e)
                    raise UnitFailed(f"{unit.key} failed: {type(e).__name__}: {e}") from e
                failures += 1
                log.error("%s failed and is skipped (it is retried when the run is resumed): %s: %s", unit.key,
                          type(e).__name__, e)
                row = {"unit": unit.key, "error": f"{type(e).__name__}: {e}",
                       "at": dt.datetime.now().isoformat(timespec="seconds")}
                append_jsonl(run_dir / "failures.jsonl", [row | ({"rank": ranks.rank} if ranks.world > 1 else {})])
            else:
                journal.append(unit, records)
                log.info("%s done: %s", unit.key, {r["case_id"]: r.get("stages") for r in records})
            if ranks.rank == 0:
                rows = journal_rows(run_dir, units)
                rebuild_outputs(run_dir, units, rows)
                bar.n = len(done_units(units, rows)) + failures
                bar.refresh()
    return failures


def load_editor(args: Any, p: Prepared, run_dir: Path) -> Editor:
    """Load the model and tokenizer the run needs and wrap them in an Editor."""
    import torch

    from model import load_model, load_tokenizer
    from model.load import default_device

    source = args.model_path or p.cfg.model.source
    device = rank_device(args.device or str(default_device()))  # under torchrun: this rank's GPU
    log.info("loading %s (%s) on %s", source, p.cfg.model.dtype, device)
    dtype = None if p.cfg.model.dtype == "auto" else getattr(torch, p.cfg.model.dtype)  # None: loader default
    model = load_model(source, dtype=dtype, device=device)
    tok = load_tokenizer(source)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_root() / "bootstrap" / args.datatype
    return Editor(model, tok, p.cfg, p.method, model_id=str(source), cache_dir=cache_dir,
                  adapters_dir=run_dir / "adapters" if args.save_adapters else None)


def _finish(run_dir: Path, units: list[Unit], info: dict, complete: bool = True) -> None:
    rows = journal_rows(run_dir, units)
    records = rebuild_outputs(run_dir, units, rows)
    if complete and len(done_units(units, rows)) == len(units):
        info.update(status="finished", units_done=len(units),
                    finished_at=dt.datetime.now().isoformat(timespec="seconds"))
        atomic_write_json(run_dir / "meta" / "run_info.json", info)
    print("\n".join(summary_table(records, info.get("method", ""))))


def summary_table(records: list[dict], method: str) -> list[str]:
    """One table: strict-grader H-Acc / M-Acc (docs/grading.md), then mean seconds and max peak GPU memory
    per stage."""
    res = string_match_summary(records)
    strict = res["strict"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [f"{method}: {res['total_cases']} cases   H-Acc (strict) {pct(strict['overall_hop_wise_average'])}"
             f"   M-Acc (strict) {pct(strict['accuracy_averages']['any_right_accuracy'])}",
             f"{'stage':<12} {'mean s/case':>12} {'max peak GiB':>13}"]
    names: list[str] = []
    for r in records:
        names += [n for n in r.get("stages", {}) if n not in names]
    for n in names:
        vals = [r["stages"][n] for r in records if n in r.get("stages", {})]
        mean_s = sum(v["seconds"] for v in vals) / len(vals)
        peak = max(v["peak_gpu_mem_bytes"] for v in vals) / 2**30
        lines.append(f"{n:<12} {mean_s:>12.2f} {peak:>13.2f}")
    return lines

"""One editing run end to end: pick cases, lay out the run directory (METHOD.md 7.1), edit and
evaluate unit by unit with a progress bar, and resume after a crash.

`metrics.jsonl` (one fsynced line per finished case) is the run's source of truth; metrics.json and
res.json are rebuilt from it atomically after every unit, so a kill -9 loses at most the unit in
flight and a rerun never repeats or duplicates a finished case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from code_edit.config import CausalEditConfig, load_hparams
from code_edit.data import (EditRequest, batch_edit_groups, case_has_articles, default_cache_root, edit_requests,
                            load_dataset, order_cases)
from code_edit.editor import Editor, Reporter, needs_articles, normalize_method
from eval.files import append_jsonl, atomic_write_json, read_json, read_jsonl
from eval.probes import string_match_summary

log = logging.getLogger("code_edit")

# Arguments that change what a run computes: a run directory is resumed only when they all agree.
IDENTITY_KEYS = ("editing_method", "datatype", "model_type", "hparams_path", "max_cases", "hop", "shuffle_seed",
                 "exp_tag", "batch_edit", "skip_cases", "data_path", "model_path")


class RunError(RuntimeError):
    """A run that cannot start or resume as asked (the message says why and what to do)."""


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
    return {k: run_args.get(k) for k in IDENTITY_KEYS}


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} (run dir) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _read_meta(run_dir: Path) -> tuple[dict, dict] | None:
    try:
        return read_json(run_dir / "meta" / "run_args.json"), read_json(run_dir / "meta" / "run_info.json")
    except (FileNotFoundError, ValueError):
        return None


def choose_run_dir(parent: Path, prefix: str, run_id: str | None, run_args: dict,
                   hparams: dict) -> tuple[Path, bool]:
    """(run directory, resuming?).

    --run_id given: that directory; resumed if it exists (its arguments and hparams must match).
    --run_id not given: the newest unfinished directory under `parent` with the same name prefix,
    arguments and hparams is resumed; otherwise a new one named by the current time.
    """
    if run_id:
        d = parent / f"{prefix}{run_id}"
        meta = _read_meta(d)
        if meta is None:
            if d.exists() and any(d.iterdir()):
                raise RunError(f"{d} exists but has no readable meta/run_args.json and meta/run_info.json; "
                               "choose another --run_id")
            return d, False
        diff = _differences(_identity(meta[0]), _identity(run_args))
        if meta[1].get("hparams") != hparams:
            diff.append("hparams differ from meta/run_info.json")
        if diff:
            raise RunError(f"{d} was started with other settings; resume it with the same command, or pick "
                           f"another --run_id. Differences: " + "; ".join(diff))
        return d, True
    candidates = []
    for d in parent.glob(f"{prefix}*") if parent.is_dir() else []:
        meta = _read_meta(d)
        if meta is None or meta[1].get("status") == "finished":
            continue
        if _identity(meta[0]) == _identity(run_args) and meta[1].get("hparams") == hparams:
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
    """metrics.jsonl rows {"unit", "case_id", "record"}; appended with fsync after each unit."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"

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


def setup_logging(run_dir: Path) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    fh.setLevel(logging.INFO)
    fh.setFormatter(fmt)
    ch = _TqdmHandler()
    ch.setLevel(logging.WARNING)
    ch.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (fh, ch):
        root.addHandler(h)
    return [fh, ch]


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


def prepare(args: Any) -> Prepared:
    """Config, method and the ordered units, before anything is written or loaded."""
    if not args.model_type and not args.hparams_path:
        raise RunError("give --model_type (a preset: see code_edit/hparams/) or --hparams_path FILE.toml")
    cfg = load_hparams(args.hparams_path or args.model_type)
    method = normalize_method(args.editing_method)
    model_type = args.model_type or cfg.name
    exp_tag = args.exp_tag or (f"T{int(cfg.teacher_use_sft)}_S{int(cfg.student_use_sft)}"
                               if method == "CausalEdit" else "default")
    cases = load_dataset(args.datatype, data_path=args.data_path)
    info = {"name": args.datatype, "data_path": args.data_path, "cases_loaded": len(cases)}
    if needs_articles(method, cfg):
        kept = [c for c in cases if case_has_articles(c)]
        if len(kept) < len(cases):
            log.warning("%s: %s reads the causal articles; kept %d of %d cases that have one for every rewrite",
                        args.datatype, method, len(kept), len(cases))
        if not kept:
            raise RunError(f"{args.datatype}: no case has an article for every rewrite; {method} needs them "
                           "(generate them with python -m scaffold)")
        cases = kept
    info["cases_with_articles_kept"] = len(cases) if needs_articles(method, cfg) else None
    ordered = order_cases(cases, seed=args.shuffle_seed, hop=args.hop, max_cases=args.max_cases,
                          skip_cases=args.skip_cases, batch_mode=args.batch_edit > 0)
    if not ordered:
        raise RunError("no case left to edit after --hop / --max_cases / --skip_cases")
    units = plan_units(ordered, args.batch_edit)
    info["cases_selected"] = case_count(units)
    return Prepared(cfg, method, model_type, exp_tag, units, info)


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


def execute(args: Any, *, editor_factory: Any = None) -> Path:
    """Run (or resume) the editing run the arguments describe; returns its directory."""
    p = prepare(args)
    cfg, units = p.cfg, p.units
    run_args = {k: v for k, v in vars(args).items() if k != "cmd"}
    run_args.update(editing_method=p.method, model_type=p.model_type, exp_tag=p.exp_tag)
    parent = run_parent(args.output_root, args.datatype, p.model_type, p.method, p.exp_tag)
    prefix = run_dir_prefix(case_count(units), args.batch_edit, args.shuffle_seed)
    hparams = json.loads(json.dumps(cfg.to_dict()))  # as stored in run_info.json (tuples become lists)
    run_dir, resuming = choose_run_dir(parent, prefix, args.run_id, run_args, hparams)
    run_args["run_id"] = run_dir.name[len(prefix):]
    with locked(run_dir):
        handlers = setup_logging(run_dir)
        try:
            return _execute_locked(args, p, run_dir, run_args, resuming, editor_factory)
        finally:
            for h in handlers:
                logging.getLogger().removeHandler(h)
                h.close()


def _execute_locked(args, p: Prepared, run_dir: Path, run_args: dict, resuming: bool, editor_factory) -> Path:
    cfg, units = p.cfg, p.units
    meta = run_dir / "meta"
    planned = _requests_json(units)
    journal = Journal(run_dir)
    if resuming:
        old = read_json(run_dir / "requests.json", "requests.json") if (run_dir / "requests.json").exists() else None
        if old is not None and [u["unit"] for u in old] != [u["unit"] for u in planned]:
            raise RunError(f"{run_dir}: the planned cases differ from its requests.json (did the dataset file change?); "
                           "start a new run with another --run_id")
        info = read_json(meta / "run_info.json", "run_info.json")
        dropped = journal.repair()
        if dropped:
            log.warning("metrics.jsonl: dropped a torn last line (%d bytes) left by an interrupted write", dropped)
    else:
        info = {"hparams": json.loads(json.dumps(cfg.to_dict())), "hparams_name": cfg.name, "method": p.method,
                "model_source": args.model_path or cfg.model.source, "dtype": cfg.model.dtype,
                "eval_generation": dataclasses.asdict(cfg.eval), "dataset": p.dataset,
                "started_at": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit(),
                "python": platform.python_version(), "units_total": len(units), "status": "running"}
        atomic_write_json(meta / "run_args.json", run_args)
        atomic_write_json(run_dir / "requests.json", planned)
    rows = journal.rows()
    done = done_units(units, rows)
    rebuild_outputs(run_dir, units, rows)
    todo = [u for u in units if u.key not in done]
    info.update(status="running" if todo else "finished", units_done=len(done), resumed_at=(
        dt.datetime.now().isoformat(timespec="seconds") if resuming else None))
    atomic_write_json(meta / "run_info.json", info)
    print(f"run dir: {run_dir}", file=sys.stderr)
    msg = (f"resuming: {len(done)}/{len(units)} units finished, {len(todo)} to go" if resuming else
           f"new run: {len(units)} units ({case_count(units)} cases), method {p.method}, preset {cfg.name}")
    print(msg, file=sys.stderr)
    log.info("%s; %s", run_dir, msg)
    if not todo:
        _finish(run_dir, units, info)
        return run_dir

    editor = (editor_factory or load_editor)(args, p, run_dir)
    info.update(device=str(editor.device), model_dtype=str(editor.model.lm_head.weight.dtype).removeprefix("torch."))
    atomic_write_json(meta / "run_info.json", info)
    from tqdm import tqdm

    failures = 0
    with tqdm(total=len(units), initial=len(done), unit="group" if args.batch_edit > 0 else "case",
              dynamic_ncols=True, file=sys.stderr) as bar:
        reporter = BarReporter(bar)
        editor.reporter = reporter
        for unit in todo:
            reporter.start_unit(unit.key)
            try:
                records = editor.run_unit(unit.key, unit.requests, unit.cases, group=unit.group)
            except Exception as e:
                if getattr(args, "on_error", "stop") != "skip":
                    log.error("%s failed: %s: %s (rerun the same command to resume)", unit.key, type(e).__name__, e,
                              exc_info=True)
                    raise
                failures += 1
                log.error("%s failed and is skipped (it is retried when the run is resumed): %s: %s\n%s", unit.key,
                          type(e).__name__, e, traceback.format_exc())
                append_jsonl(run_dir / "failures.jsonl", [{"unit": unit.key, "error": f"{type(e).__name__}: {e}",
                                                           "at": dt.datetime.now().isoformat(timespec="seconds")}])
                bar.update(1)
                continue
            journal.append(unit, records)
            rows.update({(unit.key, r["case_id"]): r for r in records})
            rebuild_outputs(run_dir, units, rows)
            log.info("%s done: %s", unit.key, {r["case_id"]: r.get("stages") for r in records})
            bar.update(1)
    info["units_done"] = len(done_units(units, rows))
    if failures:
        info["status"] = "incomplete"
        atomic_write_json(meta / "run_info.json", info)
        print(f"{failures} unit(s) failed (see {run_dir / 'failures.jsonl'}); rerun the same command to retry them",
              file=sys.stderr)
    _finish(run_dir, units, info, complete=not failures)
    return run_dir


def load_editor(args: Any, p: Prepared, run_dir: Path) -> Editor:
    """Load the model and tokenizer the run needs and wrap them in an Editor."""
    import torch

    from model import load_model, load_tokenizer
    from model.load import default_device

    source = args.model_path or p.cfg.model.source
    device = torch.device(args.device) if args.device else default_device()
    log.info("loading %s (%s) on %s", source, p.cfg.model.dtype, device)
    dtype = None if p.cfg.model.dtype == "auto" else getattr(torch, p.cfg.model.dtype)  # None: loader default
    model = load_model(source, dtype=dtype, device=device)
    tok = load_tokenizer(source)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_root() / "bootstrap" / args.datatype
    return Editor(model, tok, p.cfg, p.method, model_id=str(source), cache_dir=cache_dir,
                  adapters_dir=run_dir / "adapters" if args.save_adapters else None)


def _finish(run_dir: Path, units: list[Unit], info: dict, complete: bool = True) -> None:
    rows = Journal(run_dir).rows()
    records = rebuild_outputs(run_dir, units, rows)
    if complete and len(done_units(units, rows)) == len(units):
        info.update(status="finished", units_done=len(units),
                    finished_at=dt.datetime.now().isoformat(timespec="seconds"))
        atomic_write_json(run_dir / "meta" / "run_info.json", info)
    print("\n".join(summary_table(records, info.get("method", ""))))


def summary_table(records: list[dict], method: str) -> list[str]:
    """One table: string-match H-Acc / M-Acc, then mean seconds and max peak GPU memory per stage."""
    res = string_match_summary(records)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [f"{method}: {res['total_cases']} cases   H-Acc (string match) {pct(res['overall_hop_wise_average'])}"
             f"   M-Acc (string match) {pct(res['accuracy_averages']['qa'])}",
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

"""One editing run end to end: check the arguments, pick the cases, open the run folder
(code_edit.run_folder), edit and evaluate unit by unit with a progress bar, and print the summary. One
process runs `execute` alone; under torchrun code_edit.distributed shares the units among the ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
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
from code_edit.data import BATCH_EDIT_MAX_UNIQUE, case_has_articles, default_cache_root, load_dataset, order_cases
from code_edit.distributed import Ranks, env_ranks, rank_device
from code_edit.run_folder import (Journal, RunError, Unit, UnitFailed, carry_stop, case_count, choose_run_dir,
                                  data_hash, done_units, journal_name, journal_paths, journal_rows, locked,
                                  plan_units, rebuild_outputs, record_stop, run_dir_prefix, run_parent)
from code_edit.editor import Editor, Reporter, needs_articles, normalize_method
from eval.files import append_jsonl, atomic_write_json, read_json, sweep_temp_files
from eval.probes import string_match_summary

log = logging.getLogger("code_edit")

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
    level = root.level
    root.setLevel(logging.INFO)
    for h in (fh, ch):
        root.addHandler(h)
    try:
        yield
    finally:
        for h in (fh, ch):
            root.removeHandler(h)
            h.close()
        root.setLevel(level)  # a caller running several runs in one process keeps its own level


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


def run_args_of(args: Any, p: Prepared) -> dict:
    """meta/run_args.json: the arguments, with the method, preset and tag as prepare() resolved them."""
    run_args = {k: v for k, v in vars(args).items() if k != "cmd"}
    run_args.update(editing_method=p.method, model_type=p.model_type, exp_tag=p.exp_tag)
    return run_args


def stored_hparams(cfg: CausalEditConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))  # as stored in run_info.json (tuples become lists)


def new_run_info(args: Any, p: Prepared) -> dict:
    """meta/run_info.json of a run that starts now (the edit loop adds the device and the progress)."""
    cfg = p.cfg
    return {"hparams": stored_hparams(cfg), "hparams_name": cfg.name, "method": p.method,
            "model_source": args.model_path or cfg.model.source, "dtype": cfg.model.dtype,
            "eval_generation": dataclasses.asdict(cfg.eval), "dataset": p.dataset,
            "started_at": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit(),
            "python": platform.python_version(), "units_total": len(p.units), "status": "running"}


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
    """Run (or resume) the editing run the arguments describe; returns its directory. Under torchrun
    (WORLD_SIZE > 1) code_edit.distributed.execute_ranked shares the work among the ranks."""
    if env_ranks().world > 1:
        from code_edit.distributed import execute_ranked
        return execute_ranked(args, editor_factory)
    ranks = Ranks()
    with contextlib.ExitStack() as stack:
        # 1) plan, open (or resume) the run folder
        start, info = open_run(args, ranks, stack)
        # 2) edit and evaluate the units still to do
        todo = set(start.todo)
        failures = edit_units(args, start.p, start.run_dir, [u for u in start.p.units if u.key in todo], ranks,
                              info, editor_factory)
        # 3) the outputs, the status and the summary
        conclude(start, info, failures)
        return start.run_dir


def conclude(start: Start, info: dict, failures: int) -> None:
    """After every unit ran: mark an incomplete run (units failed under --on_error skip) or a finished one,
    rebuild the outputs and print the summary."""
    run_dir = start.run_dir
    if failures:
        info["status"] = "incomplete"
        atomic_write_json(run_dir / "meta" / "run_info.json", info)
        print(f"{failures} unit(s) failed (see {run_dir / 'failures.jsonl'}); rerun the same command to retry them",
              file=sys.stderr)
    _finish(run_dir, start.p.units, info, complete=not failures)


def edit_units(args: Any, p: Prepared, run_dir: Path, mine: list[Unit], ranks: Ranks, info: dict,
               editor_factory: Any) -> int:
    """_edit_units, with the run's status recorded when it stops early (rank 0 owns run_info.json)."""
    try:
        return _edit_units(args, p, run_dir, mine, ranks, info, editor_factory)
    except BaseException as e:
        if ranks.rank == 0:
            record_stop(run_dir, info, e)
        raise


def open_run(args: Any, ranks: Ranks, stack: contextlib.ExitStack) -> tuple[Start, dict]:
    """Rank 0 (or the only process): plan, choose and lock the run directory, write or check its
    meta files, repair the journals; returns the start message and run_info."""
    p = prepare(args)
    cfg, units = p.cfg, p.units
    run_args = run_args_of(args, p)
    parent, prefix = planned_dir(args, p)
    hparams = stored_hparams(cfg)
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
        info = carry_stop(read_json(meta / "run_info.json", "run_info.json"))
        info.setdefault("dataset", {}).setdefault("content_sha256", p.dataset["content_sha256"])  # older runs
        for path in journal_paths(run_dir):  # before any rank appends again
            dropped = Journal(path.parent, path.name).repair()
            if dropped:
                log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path.name, dropped)
    else:
        info = new_run_info(args, p)
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

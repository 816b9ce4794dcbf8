"""`python -m eval judge-agreement`: how often each judge agrees with the hand labels of the validation
set (tests/data/judge_validation.jsonl, docs/grading.md), with precision and recall of its PASS verdicts,
on all labels and on the held-out tenth."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_jsonl, read_jsonl
from .grade import grade
from .judge import STRICT, SUBSTRING, Backend, Item, decide_correctness, item_key, offline_verdict, run_items

LABELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "judge_validation.jsonl"
SRR_LABELS = LABELS.with_name("srr_validation.jsonl")  # self-refutation labels (docs/grading.md)


@dataclass
class Agreement:
    judge: str
    split: str
    n: int
    agree: float
    precision: float | None
    recall: float | None
    tp: int
    fp: int
    fn: int


def load_labels(path: str | Path = LABELS, labels: tuple[str, ...] = ("label",)) -> list[dict]:
    """Labelled rows; every field in `labels` must be true or false."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: labels not found (the validation set lives in the repository's tests/data/)")
    rows = list(read_jsonl(path))
    for n, r in enumerate(rows, 1):
        for key in ("id", "question", "answer", "refs", *labels):
            if key not in r:
                raise ValueError(f"{path}: row {n}: missing field '{key}'")
        for key in labels:
            if not isinstance(r[key], bool):
                raise ValueError(f"{path}: row {n} (id {r['id']}): '{key}' must be true or false (unlabelled row?)")
    return rows


def write_sample(path: str | Path, rows: list[dict], blank: dict) -> None:
    """Write a labelling sample atomically. `blank` names the label fields with their unlabelled values;
    labels already made for the same (id, answer) are kept, so a rerun of a sampler never loses hand work."""
    path = Path(path)
    done = {(r["id"], r["answer"]): r for r in read_jsonl(path)}
    lost = [k[0] for k, r in done.items() if any(r.get(f) not in (v, None) for f, v in blank.items() if f != "note")
            and k not in {(x["id"], x["answer"]) for x in rows}]
    if lost:
        raise ValueError(f"{path}: the new sample drops {len(lost)} labelled answers (e.g. {lost[0]}); "
                         "write it elsewhere with --out")
    out = [{**r, **{k: done.get((r["id"], r["answer"]), {}).get(k, v) for k, v in blank.items()}} for r in rows]
    atomic_write_jsonl(path, out)


def srr_agreement(rows: list[dict]) -> list[Agreement]:
    """The strict grader's self-refutation reading against the self-refutation labels: whether the answer
    states the new fact (SRR's denominator) and whether it refutes itself (its numerator)."""
    grades = [grade(r["question"], r["answer"], r["refs"], r.get("old_refs", [])) for r in rows]
    return [score(f"{STRICT} asserts_new", "srr-set", [g.asserts_new for g in grades], [r["asserts_new"] for r in rows]),
            score(f"{STRICT} self_refutes", "srr-set", [g.self_refutes for g in grades],
                  [r["self_refutes"] for r in rows])]


def score(judge: str, split: str, verdicts: list[bool], labels: list[bool]) -> Agreement:
    tp = sum(v and y for v, y in zip(verdicts, labels))
    fp = sum(v and not y for v, y in zip(verdicts, labels))
    fn = sum(y and not v for v, y in zip(verdicts, labels))
    n = len(labels)
    return Agreement(judge, split, n, sum(v == y for v, y in zip(verdicts, labels)) / n if n else 0.0,
                     tp / (tp + fp) if tp + fp else None, tp / (tp + fn) if tp + fn else None, tp, fp, fn)


def judge_verdicts(rows: list[dict], backend: Backend | None = None, checkpoint: Path | None = None) -> dict[str, list]:
    """judge label -> one verdict per row (True = PASS, None = no verdict): the strict grader, the
    substring rule, every judge whose verdicts the rows record, and `backend` when given."""
    items = [Item(r["id"], "validation", r["id"], r["question"], list(r["refs"]), r["answer"], list(r.get("old_refs", [])))
             for r in rows]
    for it in items:
        it.key = item_key(it.case_id, it.prompt, it.pred)
    out = {STRICT: [grade(it.prompt, it.pred, it.ref, it.old_ref).correct for it in items],
           SUBSTRING: [offline_verdict(it, SUBSTRING)["result"] == "PASS" for it in items]}
    recorded = sorted({k for r in rows for k in (r.get("verdicts") or {})})
    for judge in recorded:
        out[judge] = [_passed((r.get("verdicts") or {}).get(judge)) for r in rows]
    if backend is not None and backend.client is not None:
        with tempfile.TemporaryDirectory() as tmp:
            done = run_items(items, decide_correctness(backend), judge_id=backend.label,
                             checkpoint=checkpoint or Path(tmp) / "judge-agreement.ckpt.jsonl",
                             max_workers=backend.max_workers)
        out[backend.label] = [_passed(done[it.key]["result"]) for it in items]
    return out


def _passed(result: str | None) -> bool | None:
    return None if result not in ("PASS", "FAIL") else result == "PASS"


def agreement_table(rows: list[dict], verdicts: dict[str, list]) -> list[Agreement]:
    """Each judge on all rows and on the held-out rows; rows a judge gave no verdict are left out."""
    out = []
    for judge, vs in verdicts.items():
        for split, keep in (("all", lambda r: True), ("held-out", lambda r: r.get("heldout"))):
            pairs = [(v, r["label"]) for v, r in zip(vs, rows) if v is not None and keep(r)]
            out.append(score(judge, split, [p[0] for p in pairs], [p[1] for p in pairs]))
    old = [(grade(r["question"], r["answer"], r["refs"], r.get("old_refs", [])).asserts_old, r["label_old"])
           for r in rows if isinstance(r.get("label_old"), bool)]
    if old:
        out.append(score(f"{STRICT} asserts_old", "all", [o[0] for o in old], [o[1] for o in old]))
    return out


def table_lines(rows: list[dict], table: list[Agreement]) -> list[str]:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"
    pos = sum(r["label"] for r in rows)
    lines = [f"hand labels: {len(rows)} answers, {pos} labelled correct; held out: "
             f"{sum(bool(r.get('heldout')) for r in rows)}; srr-set: the self-refutation labels",
             f"{'judge':<40} {'split':<9} {'n':>4} {'agree':>7} {'precision':>9} {'recall':>7}"]
    lines += [f"{a.judge:<40} {a.split:<9} {a.n:>4} {pct(a.agree):>7} {pct(a.precision):>9} {pct(a.recall):>7}"
              for a in table]
    return lines

"""`python -m eval judge`: grade hop-wise and multi-hop answers PASS/FAIL with the strict offline grader
(eval.grade; or the reference's substring rule, or an LLM judge), checkpointed per item so a killed run
resumes, then H-Acc and M-Acc (docs/method.md 4.4). Also the item engine that `analyze` reuses."""
from __future__ import annotations

import copy
import hashlib
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .chat import ChatClient, ChatError, ContentFilterError, bounded_map, resolve_api_keys
from .files import append_jsonl, atomic_write_json, read_jsonl
from .grade import grade
from .mquake import stored_old_refs
from .probes import answer_matches, load_records
from .prompts import VERDICT_CHOICES, judge_messages

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.deepseek.com"  # the reference's judge endpoint and model
DEFAULT_JUDGE_MODEL = "deepseek-v4-flash"
STRICT = "strict"         # the offline grader of eval.grade (docs/grading.md)
SUBSTRING = "substring"   # the reference's rule: a gold alias anywhere in the answer, case-insensitive
JUDGED_SOURCES = ("hop_wise_pred", "accuracy_pred")
PARSE_ATTEMPTS = 3  # asks per item when the judge's reply cannot be parsed


@dataclass
class Item:
    """One stored answer to judge. `path` locates it under `post`, e.g. hop_wise_pred[2][1]."""
    case_id: Any
    source: str
    path: str
    prompt: str
    ref: list[str]
    pred: str
    old_ref: list[str] = field(default_factory=list)  # the answer the edit replaced, when known
    key: str = ""
    extra: dict = field(default_factory=dict)


class VerdictError(RuntimeError):
    """The judge answered, but not in the required format (after PARSE_ATTEMPTS tries)."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


def item_key(*parts: Any) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ backend

@dataclass
class Backend:
    """Who judges: an OpenAI-compatible endpoint (`client`), or offline (client None) the strict
    grader or the reference's substring rule (`offline`)."""
    client: ChatClient | None
    max_workers: int = 1
    guided: bool = False  # replies constrained to the well-formed verdicts (guided_choice), see ask_parsed
    offline: str = STRICT

    @property
    def label(self) -> str:
        # The endpoint is left out so a resumed run may reach the same model at another address.
        if self.client is None:
            return self.offline
        return f"llm:{self.client.model}" + (":guided" if self.guided else "")


def make_backend(*, base_url: str | None, judge_model: str | None, api_key_file: str | None = None,
                 rule_based: bool = False, max_workers: int | None = None, timeout: float = 120.0,
                 max_retries: int = 6, guided: bool = False, substring: bool = False) -> Backend:
    """No key and no base URL (or `rule_based`) -> offline: the strict grader, or with `substring` the
    reference's rule. A key alone uses the reference's endpoint; a base URL alone is a local server."""
    offline = SUBSTRING if substring else STRICT
    keys = [] if rule_based or substring else resolve_api_keys(api_key_file)
    if rule_based or substring or (not keys and not base_url):
        return Backend(None, 1, offline=offline)
    client = ChatClient(base_url or DEFAULT_BASE_URL, judge_model or DEFAULT_JUDGE_MODEL, keys,
                        timeout=timeout, max_retries=max_retries)
    workers = max_workers if max_workers else 16 * max(1, len(keys))
    return Backend(client, workers, guided)


def ask_parsed(client: ChatClient, messages: list[dict], parse: Callable[[str], Any],
               choices: list[str] | None = None) -> tuple[Any, str]:
    """Ask and parse; a reply that does not parse is asked again, up to PARSE_ATTEMPTS times.
    `choices`: the reply must be one of these strings (vLLM's guided_choice request field, which
    `eval serve` also implements): a judge too small to write the format still gives a verdict, at the
    cost of its written reasoning. ChatError (incl. ContentFilterError) propagates for the caller."""
    raw, err = "", None
    params = {"guided_choice": choices} if choices else {}
    for _ in range(PARSE_ATTEMPTS):
        raw = client.complete(messages, **params)
        try:
            return parse(raw), raw
        except ValueError as e:
            err = e
    raise VerdictError(f"unparseable judge reply after {PARSE_ATTEMPTS} tries: {err}", raw)


def run_items(items: Iterable[Item], decide: Callable[[Item], dict], *, checkpoint: Path, judge_id: str,
              max_workers: int, resume: bool = True, progress: bool = True) -> dict[str, dict]:
    """Decide every item once, appending each row to a JSONL checkpoint as it finishes. With
    `resume`, rows of the same judge from earlier runs are reused, except ERROR rows, which are
    retried. Returns key -> row for all items; a row is never lost: failures become ERROR rows."""
    done: dict[str, dict] = {}
    if resume:
        for row in read_jsonl(checkpoint):
            if row.get("judge_id") == judge_id and row.get("key") and row.get("result") != "ERROR":
                done[row["key"]] = row
    elif checkpoint.exists():
        checkpoint.unlink()
    todo = list({it.key: it for it in items if it.key not in done}.values())
    if progress and done:
        print(f"resuming: {len(done)} items already judged, {len(todo)} to go", file=sys.stderr)

    def work(it: Item) -> dict:
        try:
            row = decide(it)
        except VerdictError as e:
            row = {"result": "ERROR", "error": str(e), "raw": e.raw}
        except ChatError as e:
            row = {"result": "ERROR", "error": str(e), "status": e.status}
        return {**row, "key": it.key, "judge_id": judge_id}

    results = dict(done)
    n = 0
    for it, row in bounded_map(work, todo, max_workers):
        if isinstance(row, BaseException):  # a bug in decide(): keep the item as an ERROR, say why
            row = {"result": "ERROR", "error": f"{type(row).__name__}: {row}", "key": it.key, "judge_id": judge_id}
        append_jsonl(checkpoint, [row])
        results[it.key] = row
        n += 1
        if progress and (n % 50 == 0 or n == len(todo)):
            print(f"judged {n}/{len(todo)}", file=sys.stderr)
    return results


def judge_rows(items: list[Item], decide: Callable[[Item], dict], backend: Backend, checkpoint: Path, *,
               resume: bool = True, progress: bool = True) -> dict[str, dict]:
    """key -> verdict row. An endpoint judge goes through the checkpoint (run_items); an offline rule is
    decided in memory every time, so a changed rule never reuses a stale row, and the checkpoint, which
    holds other judges' verdicts too, is left as it is."""
    if backend.client is None:
        return {it.key: {**decide(it), "key": it.key, "judge_id": backend.label} for it in items}
    return run_items(items, decide, checkpoint=checkpoint, judge_id=backend.label, max_workers=backend.max_workers,
                     resume=resume, progress=progress)


# ------------------------------------------------------------------ answer correctness

_VERDICT = re.compile(r"<verification>(.*?)</verification>", re.IGNORECASE | re.DOTALL)


def parse_verification(text: str) -> str:
    """Exactly one <verification> tag holding PASS or FAIL; anything else is a ValueError."""
    tags = _VERDICT.findall(text)
    if len(tags) != 1:
        raise ValueError(f"expected exactly one <verification> tag, found {len(tags)}")
    verdict = tags[0].strip().upper()
    if verdict not in ("PASS", "FAIL"):
        raise ValueError(f"verdict must be PASS or FAIL, got {tags[0].strip()[:40]!r}")
    return verdict


def offline_verdict(item: Item, rule: str = STRICT) -> dict:
    """The strict grader's verdict with what decided it, or the substring rule's."""
    if rule == SUBSTRING:
        return {"result": "PASS" if answer_matches(item.pred, item.ref) else "FAIL", "raw": "", "method": SUBSTRING}
    g = grade(item.prompt, item.pred, item.ref, item.old_ref)
    return {"result": "PASS" if g.correct else "FAIL", "raw": "", "method": STRICT, "asserts_old": g.asserts_old,
            "rule": g.rule}


def judge_items(records: list[dict], old_answers: dict | None = None) -> list[Item]:
    """Every {prompt: str, ref: list, pred: str} dict under post.hop_wise_pred / post.accuracy_pred,
    with the replaced answer from its `old_ref`, else from `old_answers` (see old_answers_for)."""
    items = []
    for rec, source, path, d in _judge_dicts(records):
        old = d.get("old_ref")
        if not isinstance(old, list):
            old = (old_answers or {}).get((rec["case_id"], path), [])
        it = Item(rec["case_id"], source, path, d["prompt"], [str(r) for r in d["ref"]], d["pred"],
                  [str(r) for r in old])
        it.key = item_key(rec["case_id"], path, it.prompt, it.pred)
        items.append(it)
    return items


def _judge_dicts(records: list[dict]) -> Iterable[tuple[dict, str, str, dict]]:
    for rec in records:
        for source in JUDGED_SOURCES:
            for path, d in _walk(rec["post"].get(source), source):
                if isinstance(d.get("prompt"), str) and isinstance(d.get("pred"), str) and isinstance(d.get("ref"), list):
                    yield rec, source, path, d


def _walk(node: Any, path: str) -> Iterable[tuple[str, dict]]:
    if isinstance(node, dict):
        yield path, node
    elif isinstance(node, list):
        for i, x in enumerate(node):
            yield from _walk(x, f"{path}[{i}]")


def decide_correctness(backend: Backend) -> Callable[[Item], dict]:
    def decide(it: Item) -> dict:
        if backend.client is None:
            return offline_verdict(it, backend.offline)
        try:
            verdict, raw = ask_parsed(backend.client, judge_messages(it.prompt, it.ref, it.pred), parse_verification,
                                      VERDICT_CHOICES if backend.guided else None)
        except ContentFilterError:
            return {**offline_verdict(it), "method": f"{STRICT} (content filter)"}
        return {"result": verdict, "raw": raw, "method": "llm"}
    return decide


def output_dir(input_path: Path, kind: str) -> Path:
    """<run>/judge or <run>/analysis; nested by input name when the input is not metrics.json."""
    base = input_path.parent / kind
    return base if input_path.name == "metrics.json" else base / input_path.stem


def run_judge(input_path: str | Path, backend: Backend, *, summary_path: str | Path | None = None,
              progress: bool = True, cases: list[dict] | None = None) -> dict:
    """Judge a run's metrics.json; write judge/metrics.judged.json and the summary; return it.
    `cases`: the run's MQuAKE cases, for the old answers of runs that did not store them. Offline
    verdicts are recomputed every time (they are cheap, and a changed rule must not be reused)."""
    input_path = Path(input_path)
    records = load_records(input_path)
    if not records:
        raise ValueError(f"{input_path}: no per-case records to judge")
    out = output_dir(input_path, "judge")
    items = judge_items(records, stored_old_refs(records, cases))
    rows = judge_rows(items, decide_correctness(backend), backend, out / "metrics.judged.ckpt.jsonl", progress=progress)
    judged = attach_verdicts(records, rows)
    summary = summarize_judged(judged)
    summary["judge"] = backend.label
    summary["base_url"] = backend.client.shown if backend.client else None  # no user-info or keys
    atomic_write_json(out / "metrics.judged.json", judged)
    atomic_write_json(Path(summary_path) if summary_path else out / "metrics.judged.summary.json", summary)
    return summary


def offline_summary(records: list[dict], rule: str = STRICT, cases: list[dict] | None = None) -> dict:
    """H-Acc and M-Acc of records by an offline rule, in the judge summary's keys (for res.json); `cases`
    (the run's MQuAKE cases) give the old answers as eval.mquake.stored_old_refs reads them."""
    items = judge_items(records, stored_old_refs(records, cases))
    rows = {it.key: offline_verdict(it, rule) for it in items}
    s = summarize_judged(attach_verdicts(records, rows))
    return {"overall_hop_wise_average": s["overall_hop_wise_average"], "accuracy_averages": s["accuracy_averages"]}


def attach_verdicts(records: list[dict], rows: dict[str, dict]) -> list[dict]:
    """A copy of the records where every judged item has judge = {result, raw, method[, error]}."""
    judged = copy.deepcopy(records)
    for rec, _, path, d in _judge_dicts(judged):
        row = rows[item_key(rec["case_id"], path, d["prompt"], d["pred"])]
        d["judge"] = {k: row[k] for k in ("result", "raw", "method", "error", "asserts_old", "rule") if k in row}
    return judged


def summarize_judged(judged: list[dict]) -> dict:
    """H-Acc, the per-question multi-hop average and M-Acc from judged records. ERROR items are
    left out of every denominator and counted on their own; a case whose multi-hop questions
    have no PASS but some ERROR is 'undetermined' for M-Acc and counted, not scored."""
    hop_cases, qa_cases, any_cases = [], [], []
    undetermined = 0
    counts: Counter = Counter()
    by_source: dict[str, Counter] = {s: Counter() for s in JUDGED_SOURCES}
    errors: Counter = Counter()
    cases_with_errors = 0
    for rec in judged:
        post = rec["post"]
        had_error = False
        hop_rates = []
        for hop in post.get("hop_wise_pred") or []:
            res = [d["judge"]["result"] for _, d in _walk(hop, "") if "judge" in d]
            decided = [r for r in res if r in ("PASS", "FAIL")]
            if decided:
                hop_rates.append(decided.count("PASS") / len(decided))
        if hop_rates:
            hop_cases.append(sum(hop_rates) / len(hop_rates))
        multi = [d["judge"]["result"] for _, d in _walk(post.get("accuracy_pred"), "") if "judge" in d]
        decided = [r for r in multi if r in ("PASS", "FAIL")]
        if decided:
            qa_cases.append(decided.count("PASS") / len(decided))
        if "PASS" in decided:
            any_cases.append(1.0)
        elif multi and len(decided) == len(multi):
            any_cases.append(0.0)
        elif multi:
            undetermined += 1
        for source in JUDGED_SOURCES:
            for _, d in _walk(post.get(source), source):
                if "judge" not in d:
                    continue
                r = d["judge"]["result"]
                counts[r] += 1
                by_source[source][r] += 1
                if r == "ERROR":
                    had_error = True
                    errors[_error_kind(d["judge"].get("error", ""))] += 1
        cases_with_errors += had_error

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "total_cases": len(judged),
        "overall_hop_wise_average": mean(hop_cases),
        "accuracy_averages": {"qa": mean(qa_cases), "any_right_accuracy": mean(any_cases)},
        "cases_scored": {"hop_wise": len(hop_cases), "qa": len(qa_cases), "any_right_accuracy": len(any_cases),
                         "any_right_undetermined": undetermined},
        "items": {"total": sum(counts.values()), "PASS": counts["PASS"], "FAIL": counts["FAIL"],
                  "ERROR": counts["ERROR"], "asserts_old": sum(bool(d["judge"].get("asserts_old")) for rec in judged
                                                               for s in JUDGED_SOURCES
                                                               for _, d in _walk(rec["post"].get(s), s) if "judge" in d)},
        "items_by_source": {s: {"PASS": c["PASS"], "FAIL": c["FAIL"], "ERROR": c["ERROR"]}
                            for s, c in by_source.items()},
        "cases_with_errors": cases_with_errors,
        "errors": dict(errors.most_common(10)),
        "method_counts": dict(Counter(d["judge"].get("method", "?") for rec in judged for s in JUDGED_SOURCES
                                      for _, d in _walk(rec["post"].get(s), s) if "judge" in d)),
    }


def _error_kind(msg: str) -> str:
    """Group error messages for the summary (drop per-request details such as key numbers)."""
    msg = re.sub(r"\(API key #\d+ of \d+\)", "", msg)
    return re.sub(r"\s+", " ", msg).strip()[:160] or "unknown"


def summary_lines(s: dict) -> list[str]:
    """The human-readable judge report (stdout)."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"
    acc = s["accuracy_averages"]
    cs = s["cases_scored"]
    it = s["items"]
    lines = [f"judge: {s.get('judge', '?')}   cases: {s['total_cases']}",
             f"H-Acc (hop-wise, mean over cases of mean over hops of PASS share): {pct(s['overall_hop_wise_average'])}"
             f"  [{cs['hop_wise']} cases]",
             f"multi-hop per-question average: {pct(acc['qa'])}  [{cs['qa']} cases]",
             f"M-Acc (case passes if any of its questions passes): {pct(acc['any_right_accuracy'])}"
             f"  [{cs['any_right_accuracy']} cases; {cs['any_right_undetermined']} undetermined because of ERROR]",
             f"items: {it['total']}  PASS {it['PASS']}  FAIL {it['FAIL']}",
             f"ERROR items (not scored, re-judged on the next run): {it['ERROR']}"
             f" in {s['cases_with_errors']} cases"]
    for msg, n in s.get("errors", {}).items():
        lines.append(f"  {n} x {msg}")
    return lines

"""`python -m eval analyze` and `extract-ce`: self-refutation per item and per rewrite, the
self-refutation rate SRR (docs/method.md 4.5), "why" rationale alignment with the article (4.6), and the
causal-enhanced comparison with an exact McNemar test (4.7)."""
from __future__ import annotations

import copy
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .chat import ContentFilterError
from .files import atomic_write_json, read_json
from .grade import grade
from .judge import STRICT, Backend, Item, ask_parsed, item_key, judge_rows, output_dir
from .mquake import target_str
from .probes import CONFLICT_PER_REWRITE, OLD_PER_REWRITE, load_records, normalize_answer
from .prompts import SELF_REFUTE_CHOICES, WHY_CHOICES, self_refute_messages, why_messages

CE_SUFFIX = "_only_causal_enhanced"
FLAGS = ("conflict_probe", "conflict_probe_tell_me_about_first", "hop_wise_pred", "combined",
         "combined_tell_me_about_first")
SRR_LABEL = "Combined (any source), among rewrites with hop_wise_pred assertion_of_target_new=true"
ASSERTED = "hop_wise_pred assertion_of_target_new=true"
_ANALYSIS_KEYS = ("assertion_of_target_new", "explicit_negation_of_target_new", "final_submitted_answer_target_new")
# post keys that are not self-refutation items (docs/method.md 4.5), and old_knowledge_probe (see docs/evaluation.md "Self-refutation").
_NOT_ANALYSED = {"hop_wise", "accuracy", "accuracy_pred", "causal_enhanced_hop_wise_pred",
                 "causal_enhanced_conflict_probe", "old_knowledge_probe"}


# ------------------------------------------------------------------ items and their rewrites

def hop_item_rewrite(item: dict, rewrites: list[dict]) -> int | None:
    """The rewrite whose normalised target_new equals a normalised ref; else the one whose
    normalised subject occurs in the normalised prompt; else None (an unedited hop)."""
    refs = {normalize_answer(str(r)) for r in item.get("ref", [])}
    for r, rw in enumerate(rewrites):
        if normalize_answer(target_str(rw["target_new"])) in refs:
            return r
    prompt = normalize_answer(item.get("prompt", ""))
    for r, rw in enumerate(rewrites):
        subject = normalize_answer(rw.get("subject", ""))
        if subject and subject in prompt:
            return r
    return None


def is_tell_first(prompt: str) -> bool:
    return bool(re.search(r"tell me about .+ first, and then answer", prompt, re.IGNORECASE | re.DOTALL))


def self_refute_items(records: list[dict]) -> tuple[list[Item], Counter]:
    """Items for self-refutation with their rewrite, plus counts of what was skipped and why.
    old_knowledge_probe answers are skipped: there the prompt itself states Target_New and the
    correct answer is the old fact, so "asserts then answers otherwise" is the expected behaviour."""
    items: list[Item] = []
    skipped: Counter = Counter()
    for rec in records:
        cid, post, rws = rec["case_id"], rec["post"], rec.get("requested_rewrite") or []
        for source, value in post.items():
            if source in _NOT_ANALYSED:
                if source == "old_knowledge_probe":
                    skipped["old_knowledge_probe (not a self-refutation item)"] += len(value or [])
                continue
            if source == "hop_wise_pred":
                for h, hop in enumerate(value or []):
                    for s, d in enumerate(hop if isinstance(hop, list) else []):
                        if not isinstance(d, dict):
                            skipped["hop_wise_pred entry that is not an object"] += 1
                            continue
                        r = hop_item_rewrite(d, rws)
                        if r is None:
                            skipped["hop_wise_pred on an unedited hop"] += 1
                            continue
                        items.append(_item(cid, source, f"{source}[{h}][{s}]", d, r, rws))
            elif source == "conflict_probe":
                for k, d in enumerate(value or []):
                    r = k // CONFLICT_PER_REWRITE
                    if not isinstance(d, dict) or r >= len(rws):
                        skipped["conflict_probe beyond the case's rewrites"] += 1
                        continue
                    items.append(_item(cid, source, f"{source}[{k}]", d, r, rws))
            else:
                skipped[f"{source} (unknown source)"] += 1
    return items, skipped


def _item(cid: Any, source: str, path: str, d: dict, r: int, rws: list[dict]) -> Item:
    ref = [str(x) for x in d.get("ref") or [target_str(rws[r]["target_new"])]]
    old = d.get("old_ref") if isinstance(d.get("old_ref"), list) else [target_str(rws[r]["target_true"])]
    it = Item(cid, source, path, str(d.get("prompt", "")), ref, str(d.get("pred", "")), [str(x) for x in old],
              extra={"rewrite_idx": r, "tell_first": source == "conflict_probe" and is_tell_first(d.get("prompt", ""))})
    it.key = item_key(cid, path, it.pred)
    return it


# ------------------------------------------------------------------ self-refutation verdicts

def parse_self_refute(text: str) -> dict:
    """The judge's JSON (whole reply, or its outermost {...}); flags must be booleans, evidence a string."""
    try:
        obj = json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise ValueError("no JSON object in the reply") from None
        try:
            obj = json.loads(text[start:end + 1])
        except ValueError as e:
            raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("analysis"), dict):
        raise ValueError("missing 'analysis' object")
    for k in _ANALYSIS_KEYS:
        if not isinstance(obj["analysis"].get(k), bool):
            raise ValueError(f"analysis.{k} must be a boolean")
    if not isinstance(obj.get("self_refutation_detected"), bool):
        raise ValueError("self_refutation_detected must be a boolean")
    if not isinstance(obj.get("evidence"), str):
        raise ValueError("evidence must be a string")
    return {"analysis": {k: obj["analysis"][k] for k in _ANALYSIS_KEYS},
            "self_refutation_detected": obj["self_refutation_detected"], "evidence": obj["evidence"],
            "reasoning": str(obj.get("reasoning", ""))}


def strict_self_refute(it: Item) -> dict:
    """The strict grader's reading (eval.grade): asserted = the new answer is asserted somewhere;
    negated = negated after that; final = the answer's committed answer is the new one; detected =
    asserted, not final, and negated or concluding with the old answer."""
    g = grade(it.prompt, it.pred, it.ref, it.old_ref)
    return {"analysis": {"assertion_of_target_new": g.asserts_new, "explicit_negation_of_target_new": g.negates_new,
                         "final_submitted_answer_target_new": g.correct},
            "self_refutation_detected": g.self_refutes, "evidence": g.rule, "reasoning": STRICT}


def decide_self_refute(backend: Backend):
    def decide(it: Item) -> dict:
        if backend.client is None:
            return {"result": "OK", **strict_self_refute(it), "method": STRICT}
        try:
            verdict, raw = ask_parsed(backend.client, self_refute_messages(it.prompt, it.ref, it.pred),
                                      parse_self_refute, SELF_REFUTE_CHOICES if backend.guided else None)
        except ContentFilterError:
            return {"result": "OK", **strict_self_refute(it), "method": f"{STRICT} (content filter)"}
        return {"result": "OK", **verdict, "raw": raw, "method": "llm"}
    return decide


# ------------------------------------------------------------------ rewrite flags and SRR

def rewrite_flags(items: list[Item], rows: dict[str, dict]) -> dict[str, dict]:
    """Per rewrite "{case_id}|rw{idx}": which sources self-refuted, and whether any hop answer of
    that rewrite asserted Target_New. Rewrites whose items are all ERROR are left out."""
    flags: dict[str, dict] = {}
    for it in items:
        rk = f"{it.case_id}|rw{it.extra['rewrite_idx']}"
        f = flags.setdefault(rk, {"case_id": it.case_id, "rewrite_idx": it.extra["rewrite_idx"], "items": 0,
                                  "errors": 0, **{k: False for k in FLAGS}, "retrieved_target_new_in_hop": False})
        row = rows[it.key]
        if row["result"] == "ERROR":
            f["errors"] += 1
            continue
        f["items"] += 1
        sr = row["self_refutation_detected"]
        f["combined"] |= sr
        if it.source == "hop_wise_pred":
            f["hop_wise_pred"] |= sr
            f["combined_tell_me_about_first"] |= sr
            f["retrieved_target_new_in_hop"] |= row["analysis"]["assertion_of_target_new"]
        elif it.source == "conflict_probe":
            f["conflict_probe"] |= sr
            if it.extra["tell_first"]:
                f["conflict_probe_tell_me_about_first"] |= sr
                f["combined_tell_me_about_first"] |= sr
    return {k: v for k, v in flags.items() if v["items"] > 0}


def srr_summary(flags: dict[str, dict]) -> dict:
    """Unconditional rates (all judged rewrites) and rates among rewrites whose hop answers asserted
    Target_New; SRR is the `combined` rate on that subset."""
    total = len(flags)
    asserted = [f for f in flags.values() if f["retrieved_target_new_in_hop"]]
    return {"rewrites": total,
            "unconditional": {k: _ratio(sum(f[k] for f in flags.values()), total) for k in FLAGS},
            "asserted_rewrites": _ratio(len(asserted), total),
            "conditional_on_assertion": {k: _ratio(sum(f[k] for f in asserted), len(asserted)) for k in FLAGS},
            "SRR": _ratio(sum(f["combined"] for f in asserted), len(asserted))}


def _ratio(yes: int, total: int) -> dict:
    return {"yes": yes, "total": total, "rate": yes / total if total else None}


def _fmt(r: dict) -> str:
    return f"{r['yes']} / {r['total']} ({_pct(r['rate'])})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def old_knowledge_recall(records: list[dict]) -> dict:
    """Share of old-knowledge probes whose answer asserts target_true (strict grader; the new answer,
    which the probe itself states, counts against)."""
    hits = total = 0
    for rec in records:
        rws = rec.get("requested_rewrite") or []
        for k, d in enumerate(rec["post"].get("old_knowledge_probe") or []):
            r = k // OLD_PER_REWRITE
            new = [target_str(rws[r]["target_new"])] if r < len(rws) else []
            total += 1
            hits += grade(str(d.get("prompt", "")), str(d.get("pred", "")), [str(x) for x in d.get("ref", [])],
                          new).correct
    return _ratio(hits, total)


# ------------------------------------------------------------------ rationale alignment ("why")

_TAG = {t: re.compile(rf"<{t}>(.*?)</{t}>", re.IGNORECASE | re.DOTALL) for t in ("consistency", "evidence", "reason")}


def parse_why(text: str) -> dict:
    out = {}
    for t, rx in _TAG.items():
        found = rx.findall(text)
        if len(found) != 1:
            raise ValueError(f"expected exactly one <{t}> tag, found {len(found)}")
        out[t] = found[0].strip()
    verdict = out["consistency"].upper()
    if verdict not in ("PASS", "FAIL", "UNSURE"):
        raise ValueError(f"consistency must be PASS, FAIL or UNSURE, got {out['consistency'][:40]!r}")
    return {"result": verdict, "evidence": out["evidence"], "reason": out["reason"]}


_CUE = re.compile(r"\b(because|due to|after|following|since|as a result|led to|leads to|caused|prompted|"
                  r"forced|resulted|reason|thanks to|therefore|triggered|when)\b", re.IGNORECASE)
_STOP = set("""that this with from were have been their which there they then than into over also only
about after because before being while would could should these those other what when where more most
such some very will just upon made make took said says itself under between""".split())


WORD_OVERLAP = "word-overlap"  # the offline rationale-alignment proxy below


def rule_why(article: str, prompt: str, pred: str, refs: list[str]) -> dict:
    """Offline proxy for the "why" judge: compare the content words of the cause-bearing sentences
    (sentences with a causal cue word) of article and answer, ignoring words of the question and
    of the answer names. UNSURE if either side has no causal sentence; PASS if they share at least
    two such words; else FAIL. Crude: it sees word overlap, not meaning."""
    def sentences(text: str) -> list[str]:
        return [s for s in re.split(r"[.!?\n]+", re.sub(r"<[^>]+>", " ", text)) if _CUE.search(s)]

    def words(text: str) -> set[str]:
        return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 4 and w not in _STOP}

    ignore = words(prompt).union(*(words(r) for r in refs))
    a, p = sentences(article), sentences(pred)
    if not a or not p:
        return {"result": "UNSURE", "evidence": "", "reason": "no causal sentence in the " + ("article" if not a else "answer")}
    shared = (words(" ".join(a)) & words(" ".join(p))) - ignore
    return {"result": "PASS" if len(shared) >= 2 else "FAIL", "evidence": ", ".join(sorted(shared)),
            "reason": f"{len(shared)} shared content words in causal sentences"}


def why_items(records: list[dict]) -> list[Item]:
    """hop_wise_pred "Why?" answers of edited hops whose rewrite has an article."""
    items = []
    for rec in records:
        rws = rec.get("requested_rewrite") or []
        for h, hop in enumerate(rec["post"].get("hop_wise_pred") or []):
            for s, d in enumerate(hop if isinstance(hop, list) else []):
                if not isinstance(d, dict) or "why?" not in str(d.get("prompt", "")).lower() or not str(d.get("pred", "")).strip():
                    continue
                r = hop_item_rewrite(d, rws)
                article = rws[r].get("article") if r is not None else None
                if not (isinstance(article, str) and article.strip()):
                    continue
                path = f"hop_wise_pred[{h}][{s}]"
                it = Item(rec["case_id"], "hop_wise_pred", path, d["prompt"], [str(x) for x in d.get("ref", [])],
                          d["pred"], extra={"rewrite_idx": r, "article": article})
                it.key = item_key(rec["case_id"], path, it.pred)
                items.append(it)
    return items


def decide_why(backend: Backend):
    def decide(it: Item) -> dict:
        rule = lambda: rule_why(it.extra["article"], it.prompt, it.pred, it.ref)  # noqa: E731
        if backend.client is None:
            return {**rule(), "method": WORD_OVERLAP}
        try:
            verdict, raw = ask_parsed(backend.client, why_messages(it.extra["article"], it.prompt, it.pred), parse_why,
                                      WHY_CHOICES if backend.guided else None)
        except ContentFilterError:
            return {**rule(), "method": f"{WORD_OVERLAP} (content filter)"}
        return {**verdict, "raw": raw, "method": "llm"}
    return decide


def why_summary(items: list[Item], rows: dict[str, dict]) -> dict:
    counts: Counter = Counter()
    per_rewrite: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        r = rows[it.key]["result"]
        counts[r] += 1
        if r != "ERROR":
            per_rewrite[f"{it.case_id}|rw{it.extra['rewrite_idx']}"][r] += 1
    rates = [c["PASS"] / sum(c.values()) for c in per_rewrite.values()]
    return {"PASS": counts["PASS"], "FAIL": counts["FAIL"], "UNSURE": counts["UNSURE"], "ERROR": counts["ERROR"],
            "rewrites": len(rates), "mean_rewrite_pass_rate": sum(rates) / len(rates) if rates else None}


# ------------------------------------------------------------------ extract-ce and McNemar

def extract_ce(input_path: str | Path) -> Path:
    """Write <run>_only_causal_enhanced/metrics.json: hop_wise_pred <- CE hop answers, conflict_probe
    <- CE conflict answers, hop_wise re-scored by the strict grader, accuracy and old-knowledge lists emptied."""
    input_path = Path(input_path)
    records = load_records(input_path)
    out: list[dict] = []
    for rec in records:
        post = rec["post"]
        if "causal_enhanced_hop_wise_pred" not in post:
            raise ValueError(f"{input_path}: case_id {rec['case_id']}: no causal_enhanced_hop_wise_pred "
                             "(run evaluation with causal-enhanced probes)")
        new = copy.deepcopy(rec)
        hops = copy.deepcopy(post["causal_enhanced_hop_wise_pred"])
        new["post"] = {"hop_wise": [[grade(d["prompt"], d["pred"], d["ref"], d.get("old_ref") or []).correct
                                     for d in hop] for hop in hops],
                       "hop_wise_pred": hops,
                       "accuracy": [], "accuracy_pred": [],
                       "conflict_probe": copy.deepcopy(post.get("causal_enhanced_conflict_probe", [])),
                       "old_knowledge_probe": []}
        out.append(new)
    run = input_path.parent
    dest = run.with_name(run.name + CE_SUFFIX) / "metrics.json"
    atomic_write_json(dest, out)
    atomic_write_json(dest.parent / "extract_ce_source.json", {"source": str(input_path.resolve())})
    return dest


def mcnemar_exact(n01: int, n10: int) -> float:
    """Two-sided exact McNemar p-value = min(1, 2 * P(X <= min(n01, n10))), X ~ Binomial(n01+n10, 1/2)."""
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def compare_with_original(orig_flags: dict[str, dict], ce_flags: dict[str, dict]) -> dict:
    """On the original run's asserted rewrites: per source N00/N01/N10/N11 (original -> CE),
    rates, repair N10/(N10+N11), harm N01/(N00+N01) and the exact McNemar p-value."""
    denom = [k for k, f in orig_flags.items() if f["retrieved_target_new_in_hop"]]
    both = [k for k in denom if k in ce_flags]
    out: dict[str, Any] = {"denominator_rewrites": len(denom), "compared": len(both),
                           "missing_in_ce": len(denom) - len(both), "sources": {}}
    for src in FLAGS:
        n = Counter(f"N{int(bool(orig_flags[k][src]))}{int(bool(ce_flags[k][src]))}" for k in both)
        n00, n01, n10, n11 = n["N00"], n["N01"], n["N10"], n["N11"]
        tot = n00 + n01 + n10 + n11
        out["sources"][src] = {
            "N00": n00, "N01": n01, "N10": n10, "N11": n11,
            "original_rate": (n10 + n11) / tot if tot else None, "ce_rate": (n01 + n11) / tot if tot else None,
            "repair_rate": n10 / (n10 + n11) if n10 + n11 else None,
            "harm_rate": n01 / (n00 + n01) if n00 + n01 else None,
            "mcnemar_p": mcnemar_exact(n01, n10)}
    return out


# ------------------------------------------------------------------ the analyze command

def run_analyze(input_path: str | Path, backend: Backend, *, output: str | Path | None = None,
                checkpoint: str | Path | None = None, resume: bool = True, rewrite_why: Backend | None = None,
                progress: bool = True) -> dict:
    """Self-refutation (always; LLM or the strict grader per `backend`), rationale alignment when a
    `rewrite_why` backend is given, and, for an extract-ce directory, the comparison with the
    original run. Writes analysis/pred_analysis.json and .txt; returns the json content."""
    input_path = Path(input_path)
    records = load_records(input_path)
    if not records:
        raise ValueError(f"{input_path}: no per-case records to analyse")
    out = output_dir(input_path, "analysis")
    items, skipped = self_refute_items(records)
    ckpt = Path(checkpoint) if checkpoint else out / "pred_self_refute_analysis_llm_judge_ckpt.jsonl"
    rows = judge_rows(items, decide_self_refute(backend), backend, ckpt, resume=resume, progress=progress)
    flags = rewrite_flags(items, rows)
    result: dict[str, Any] = {
        "judge": backend.label, "input": str(input_path),
        "summary": srr_summary(flags),
        "item_counts": dict(Counter(it.source for it in items)),
        "item_errors": sum(rows[it.key]["result"] == "ERROR" for it in items),
        "rewrites_with_errors": len({(i.case_id, i.extra["rewrite_idx"]) for i in items
                                     if rows[i.key]["result"] == "ERROR"}),
        "skipped": dict(skipped),
        "old_knowledge_recall": old_knowledge_recall(records),
        "rewrites": flags,
        "items": [{"case_id": it.case_id, "pred_path": it.path, "rewrite_idx": it.extra["rewrite_idx"],
                   "source": it.source, "tell_first": it.extra["tell_first"],
                   **{k: v for k, v in rows[it.key].items() if k not in ("key", "judge_id")}} for it in items],
    }
    if rewrite_why is not None:
        w_items = why_items(records)
        w_rows = judge_rows(w_items, decide_why(rewrite_why), rewrite_why, out / "rewrite_why_ckpt.jsonl",
                            resume=resume, progress=progress)
        result["rewrite_why"] = why_summary(w_items, w_rows)
        result["rewrite_why"]["judge"] = rewrite_why.label if rewrite_why.client else WORD_OVERLAP
        atomic_write_json(out / "rewrite_why_consistency_summary.json", result["rewrite_why"])
        atomic_write_json(out / "rewrite_why_consistency.json",
                          [{"case_id": it.case_id, "pred_path": it.path, "rewrite_idx": it.extra["rewrite_idx"],
                            "prompt": it.prompt, "pred": it.pred,
                            **{k: v for k, v in w_rows[it.key].items() if k not in ("key", "judge_id")}}
                           for it in w_items])
    run = input_path.parent
    if input_path.name == "metrics.json" and run.name.endswith(CE_SUFFIX):
        orig_path = run.with_name(run.name[: -len(CE_SUFFIX)]) / "analysis" / "pred_analysis.json"
        if not orig_path.exists():
            raise FileNotFoundError(f"{orig_path} is missing: run `python -m eval analyze` on the original run "
                                    "first; the causal-enhanced comparison uses its rewrites as the denominator")
        orig = read_json(orig_path, "original run analysis")
        if orig.get("judge") != backend.label:
            print(f"warning: original analysis was judged by {orig.get('judge')}, this one by {backend.label}",
                  file=sys.stderr)
        result["ce_comparison"] = compare_with_original(orig["rewrites"], flags)
    atomic_write_json(out / "pred_analysis.json", result)
    text = "\n".join(report_lines(result)) + "\n"
    txt = Path(output) if output else out / "pred_analysis.txt"
    txt.parent.mkdir(parents=True, exist_ok=True)
    tmp = txt.with_name(txt.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(txt)
    return result


def report_lines(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"Self-refutation analysis   judge: {res['judge']}",
             "items: " + ", ".join(f"{k} {v}" for k, v in sorted(res["item_counts"].items()))
             + f"; ERROR items (not scored): {res['item_errors']} in {res['rewrites_with_errors']} rewrites"]
    for why, n in sorted(res["skipped"].items()):
        lines.append(f"skipped: {n} x {why}")
    lines.append(f"rewrites judged: {s['rewrites']}")
    lines.append("Self-refutation among all judged rewrites:")
    lines += [f"  {k}: {_fmt(s['unconditional'][k])}" for k in FLAGS]
    lines.append(f"Rewrites with {ASSERTED}: {_fmt(s['asserted_rewrites'])}")
    lines.append(f"Self-refutation among rewrites with {ASSERTED}:")
    for k in FLAGS:
        label = SRR_LABEL if k == "combined" else f"{k}, among rewrites with {ASSERTED}"
        lines.append(f"  {label}: {_fmt(s['conditional_on_assertion'][k])}")
    cond = s["conditional_on_assertion"]
    lines.append("compact (conditional): " + "  ".join(f"{k}={_pct(cond[k]['rate'])}" for k in FLAGS))
    lines.append(f"SRR = {_fmt(s['SRR'])}")
    lines.append(f"old-knowledge recall (target_true in answer, string match): {_fmt(res['old_knowledge_recall'])}")
    if "rewrite_why" in res:
        w = res["rewrite_why"]
        rate = _pct(w["mean_rewrite_pass_rate"])
        lines.append(f"Rationale alignment (why-consistency, judge: {w['judge']}): PASS {w['PASS']} FAIL {w['FAIL']} "
                     f"UNSURE {w['UNSURE']}; ERROR (not scored) {w['ERROR']}; "
                     f"mean_rewrite_pass_rate {rate} over {w['rewrites']} rewrites")
    if "ce_comparison" in res:
        c = res["ce_comparison"]
        lines.append(f"Causal-enhanced vs original on the original's {c['denominator_rewrites']} asserted rewrites "
                     f"({c['compared']} compared, {c['missing_in_ce']} missing in CE):")
        p = _pct
        for src, v in c["sources"].items():
            lines.append(f"  {src}: N00 {v['N00']} N01 {v['N01']} N10 {v['N10']} N11 {v['N11']}; "
                         f"original {p(v['original_rate'])} -> CE {p(v['ce_rate'])}; repair {p(v['repair_rate'])}, "
                         f"harm {p(v['harm_rate'])}; McNemar exact p = {v['mcnemar_p']:.4g}")
    return lines

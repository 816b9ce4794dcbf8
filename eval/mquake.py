"""MQuAKE-format datasets (CF-3k-v2, T, hard and their `*_causalenhanced` versions): load,
validate every field the code uses (docs/method.md 6), and attach generated causal articles to cases.
A bad record raises MQuAKEFormatError naming the file, the case_id and the field."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from .files import read_json

# Cases the reference drops before running (docs/method.md 6.2).
EXCLUDED_CASE_IDS: dict[str, frozenset[int]] = {"MQuAKE-CF-3k-v2": frozenset({35})}


class MQuAKEFormatError(ValueError):
    """A dataset or articles file that does not have the expected shape."""


def load_mquake(path: str | Path, *, require_articles: bool = False) -> list[dict]:
    """Read and validate an MQuAKE-format JSON list. With `require_articles`, every
    requested_rewrite must carry a non-empty `article` (a `*_causalenhanced` file)."""
    path = Path(path)
    data = read_json(path, error=MQuAKEFormatError)
    if not isinstance(data, list):
        raise MQuAKEFormatError(f"{path}: expected a JSON list of cases, got {type(data).__name__}")
    seen: dict[Any, int] = {}
    for i, case in enumerate(data):
        validate_case(case, source=str(path), index=i, require_articles=require_articles)
        cid = case["case_id"]
        if cid in seen:
            raise MQuAKEFormatError(f"{path}: case_id {cid}: duplicate (records #{seen[cid]} and #{i})")
        seen[cid] = i
    return data


def validate_case(case: Any, *, source: str = "<memory>", index: int | None = None,
                  require_articles: bool = False) -> None:
    """Check one record; raise MQuAKEFormatError naming source, case_id and the dotted field path."""
    where = f"{source}: record #{index}" if index is not None else source
    if not isinstance(case, dict):
        raise MQuAKEFormatError(f"{where}: expected an object, got {type(case).__name__}")
    cid = case.get("case_id")
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise MQuAKEFormatError(f"{where}: field 'case_id': expected an integer, got {cid!r}")
    v = _Validator(f"{source}: case_id {cid}")

    rws = v.list_of(case, "requested_rewrite", dict, nonempty=True)
    for r, rw in enumerate(rws):
        f = f"requested_rewrite[{r}]"
        prompt = v.string(rw, "prompt", f)
        if "{}" not in prompt:
            v.fail(f"{f}.prompt", f"expected a template with '{{}}' for the subject, got {prompt!r}")
        v.string(rw, "subject", f)
        v.string(rw, "question", f)
        v.string(rw, "relation_id", f, required=False)
        for t in ("target_new", "target_true"):
            val = rw.get(t)
            if isinstance(val, dict):
                v.string(val, "str", f"{f}.{t}")
            elif not (isinstance(val, str) and val.strip()):
                v.fail(f"{f}.{t}", f"expected {{'str': ..., 'id': ...}} or a string, got {val!r}")
        article = rw.get("article")
        if article is not None and not isinstance(article, str):
            v.fail(f"{f}.article", f"expected a string, got {type(article).__name__}")
        if require_articles and not (isinstance(article, str) and article.strip()):
            v.fail(f"{f}.article", "missing; a *_causalenhanced dataset needs an article for every rewrite")
        for extra in ("learning_prompt", "rephrase_prompt"):
            if extra in rw:
                for j, qa in enumerate(v.list_of(rw, extra, dict, prefix=f)):
                    v.string(qa, "question", f"{f}.{extra}[{j}]")

    for j, q in enumerate(v.list_of(case, "questions", str, nonempty=True)):
        if not q.strip():
            v.fail(f"questions[{j}]", "empty question")
    v.string(case, "new_answer")
    v.list_of(case, "new_answer_alias", str)
    if "answer" in case:
        v.string(case, "answer")
    if "answer_alias" in case:
        v.list_of(case, "answer_alias", str)
    for key in ("new_single_hops", "single_hops"):
        if key == "single_hops" and key not in case:
            continue
        for j, hop in enumerate(v.list_of(case, key, dict, nonempty=True)):
            for fld in ("question", "cloze", "answer"):
                v.string(hop, fld, f"{key}[{j}]")
            v.list_of(hop, "answer_alias", str, prefix=f"{key}[{j}]")
    if "orig" in case:
        orig = case["orig"]
        if not isinstance(orig, dict):
            v.fail("orig", f"expected an object, got {type(orig).__name__}")
        for key in ("triples", "new_triples", "edit_triples"):
            if key in orig:
                for j, t in enumerate(v.list_of(orig, key, list, prefix="orig")):
                    if len(t) != 3 or not all(isinstance(x, str) for x in t):
                        v.fail(f"orig.{key}[{j}]", f"expected [subject, relation, object] strings, got {t!r}")


def target_str(target: Any) -> str:
    """`target_new` / `target_true` as text: datasets hold {'str', 'id'}, metrics.json a plain string."""
    return target["str"] if isinstance(target, dict) else str(target)


def load_articles(path: str | Path) -> dict[str, dict]:
    """Read a generated-articles file: {"{case_id}_{rewrite_idx}": {case_id, rewrite_idx, question,
    old_answer, new_answer, article}} (format of eval/data/MQuAKE-hard_articles_dev.json)."""
    path = Path(path)
    data = read_json(path, error=MQuAKEFormatError)
    if not isinstance(data, dict):
        raise MQuAKEFormatError(f"{path}: expected an object keyed '{{case_id}}_{{rewrite_idx}}'")
    for key, entry in data.items():
        _check_article_entry(key, entry, str(path))
    return data


def attach_articles(cases: list[dict], articles: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Copy `cases` and set requested_rewrite[r]['article'] from articles["{case_id}_{r}"] (docs/method.md
    5.3). Returns (merged copies, keys of rewrites left without any article). The caller's dicts are
    never modified; an article whose new_answer disagrees with the rewrite's target_new is an error."""
    merged: list[dict] = []
    missing: list[str] = []
    for case in cases:
        case = copy.deepcopy(case)
        cid = case["case_id"]
        for r, rw in enumerate(case["requested_rewrite"]):
            key = f"{cid}_{r}"
            entry = articles.get(key)
            if entry is None:
                if not (isinstance(rw.get("article"), str) and rw["article"].strip()):
                    missing.append(key)
                continue
            _check_article_entry(key, entry, "articles")
            new = entry.get("new_answer")
            if new is not None and new != target_str(rw["target_new"]):
                raise MQuAKEFormatError(
                    f"articles: key {key!r}: new_answer {new!r} does not match case_id {cid} "
                    f"requested_rewrite[{r}].target_new {target_str(rw['target_new'])!r} (wrong dataset?)")
            rw["article"] = entry["article"]
        merged.append(case)
    return merged, missing


# ---------------------------------------------------------------------------------------------

def _check_article_entry(key: str, entry: Any, source: str) -> None:
    if not isinstance(entry, dict):
        raise MQuAKEFormatError(f"{source}: key {key!r}: expected an object, got {type(entry).__name__}")
    art = entry.get("article")
    if not (isinstance(art, str) and art.strip()):
        raise MQuAKEFormatError(f"{source}: key {key!r}: field 'article' must be a non-empty string")
    if "case_id" in entry and "rewrite_idx" in entry and f"{entry['case_id']}_{entry['rewrite_idx']}" != key:
        raise MQuAKEFormatError(f"{source}: key {key!r}: case_id/rewrite_idx say "
                                f"{entry['case_id']}_{entry['rewrite_idx']}")


class _Validator:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, msg: str) -> None:
        raise MQuAKEFormatError(f"{self.where}: field '{field}': {msg}")

    def string(self, obj: dict, key: str, prefix: str = "", *, required: bool = True) -> str:
        name = f"{prefix}.{key}" if prefix else key
        if key not in obj:
            if required:
                self.fail(name, "missing")
            return ""
        val = obj[key]
        if not isinstance(val, str) or not val.strip():
            self.fail(name, f"expected a non-empty string, got {val!r}")
        return val

    def list_of(self, obj: dict, key: str, kind: type, *, prefix: str = "", nonempty: bool = False) -> list:
        name = f"{prefix}.{key}" if prefix else key
        if key not in obj:
            self.fail(name, "missing")
        val = obj[key]
        if not isinstance(val, list):
            self.fail(name, f"expected a list, got {type(val).__name__}")
        if nonempty and not val:
            self.fail(name, "empty list")
        for j, x in enumerate(val):
            if not isinstance(x, kind):
                self.fail(f"{name}[{j}]", f"expected {kind.__name__}, got {type(x).__name__}")
        return val


# ---------------------------------------------------------------- the old answer an edit replaced (for the grader)

def alias_table(cases: Iterable[dict]) -> dict[str, list[str]]:
    """answer string -> its aliases, from every single hop of every case (old and new chains)."""
    table: dict[str, list[str]] = {}
    for case in cases:
        for hop in list(case.get("single_hops") or []) + list(case.get("new_single_hops") or []):
            if not isinstance(hop, dict) or not hop.get("answer"):
                continue
            known = table.setdefault(hop["answer"], [])
            known += [a for a in hop.get("answer_alias") or [] if a not in known]
    return table


def edited_rewrite(refs: set[str] | list[str], rewrites: list[dict]) -> int | None:
    """The index of the rewrite a hop asks about: the first whose target_new is among the hop's answer
    strings (None for a hop no rewrite touched)."""
    refs = set(refs)
    return next((i for i, rw in enumerate(rewrites) if target_str(rw["target_new"]) in refs), None)


def old_refs_for(case: dict, hop: int | None, aliases: dict[str, list[str]] | None = None) -> list[str]:
    """The strings of the answer the edit replaced: for hop `hop` the target_true of the rewrite whose
    target_new the hop asks for (none for an unedited hop); for a multi-hop question (hop None) the
    case's original answer. Aliases come from `aliases` (see alias_table) or the case's own hops."""
    aliases = aliases if aliases is not None else alias_table([case])
    if hop is None:  # `answer` is optional in MQuAKE files (the method never reads it)
        old = [case["answer"], *case.get("answer_alias", [])] if case.get("answer") else []
    else:
        new = case["new_single_hops"][hop]
        r = edited_rewrite({new["answer"], *new.get("answer_alias", [])}, case["requested_rewrite"])
        if r is None:
            return []
        old = [target_str(case["requested_rewrite"][r]["target_true"])]
    return list(dict.fromkeys(old + [a for o in old for a in aliases.get(o, [])]))


def stored_old_refs(records: list[dict], cases: list[dict] | None = None) -> dict[tuple, list[str]]:
    """(case_id, item path) -> the old answer's strings for the hop-wise and multi-hop items of stored
    records. With the run's MQuAKE `cases`, as old_refs_for gives them; without, hop items take the
    target_true of the rewrite whose target_new is among their refs, and multi-hop items get none."""
    by_id = {c["case_id"]: c for c in cases or []}
    aliases = alias_table(by_id.values())
    out: dict[tuple, list[str]] = {}
    for rec in records:
        case = by_id.get(rec["case_id"])
        post = rec.get("post") or {}
        for h, hop in enumerate(post.get("hop_wise_pred") or []):
            for s, d in enumerate(hop if isinstance(hop, list) else []):
                if case is not None and h < len(case["new_single_hops"]):
                    old = old_refs_for(case, h, aliases)
                else:
                    rws = rec.get("requested_rewrite") or []
                    r = edited_rewrite(d.get("ref") or [] if isinstance(d, dict) else [], rws)
                    old = [] if r is None else [target_str(rws[r]["target_true"])]
                out[(rec["case_id"], f"hop_wise_pred[{h}][{s}]")] = old
        for k, _ in enumerate(post.get("accuracy_pred") or []):
            out[(rec["case_id"], f"accuracy_pred[{k}]")] = old_refs_for(case, None, aliases) if case else []
    return out

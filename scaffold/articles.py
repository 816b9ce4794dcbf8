"""Causal-article generation: entity profiles, generate -> extract -> verify twice, bounded retries.

Writes `generated_articles` ("{case_id}_{rewrite_idx}" -> {case_id, rewrite_idx, question, old_answer,
new_answer, article}, the reference's format) after every article, and keeps rewrites that got no
article in a separate failures file with the reason, so a rerun resumes and retries only those.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable

from eval.chat import ChatClient, ChatError
from eval.mquake import target_str
from eval.files import atomic_write_json, read_json
from scaffold.prompts import generation_messages, verification_messages
from scaffold.wikidata import render_time

PROFILE_PROPERTIES = ("occupation", "date of birth", "date of death", "place of birth", "place of death",
                      "country of citizenship", "employer", "educated at", "significant person", "genre")
DATE_PROPERTIES = ("date of birth", "date of death")
MAX_VALUES = 3  # non-date properties keep their first three values
# Credentials or a wrong model name fail every request alike: stop the run instead of recording
# thousands of identical failures.
FATAL_STATUSES = (401, 403, 404)

_ARTICLE = re.compile(r"<article>(.*?)</article>", re.DOTALL | re.IGNORECASE)
_VERDICT = re.compile(r"<verification>\s*(PASS|FAIL)\s*</verification>", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_RAW_TIME = re.compile(r"^[+-]?\d+-\d\d-\d\dT")


class ArticleRejected(ValueError):
    """One attempt produced no usable article (no tags, a FAIL verdict, a transient API failure)."""


@dataclass
class ArticleConfig:
    max_attempts: int = 10        # per rewrite; the reference allowed 200
    backoff_min: float = 4.0      # seconds before the next attempt: clamp(2**attempt, min, max)
    backoff_max: float = 10.0
    verifications: int = 2        # independent verifier calls; all must say PASS
    max_tokens: int | None = None  # sent to both models when set; None = the server's default
    max_workers: int = 1          # rewrites generated concurrently

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.verifications < 1 or self.max_workers < 1:
            raise ValueError("max_attempts, verifications and max_workers must be at least 1")


@dataclass
class Rewrite:
    key: str
    case_id: Any
    rewrite_idx: int
    question: str
    old_answer: str
    new_answer: str
    profiles: str = ""
    skip_reason: str = ""   # set when a Wikidata profile is missing (the reference skips these)

    def record(self) -> dict:
        return {"case_id": self.case_id, "rewrite_idx": self.rewrite_idx, "question": self.question,
                "old_answer": self.old_answer, "new_answer": self.new_answer}


def clean_date(value: str) -> str:
    """Raw Wikidata timestamps ('+1952-03-11T00:00:00Z') -> '1952-03-11'; other text unchanged."""
    return render_time({"time": value, "precision": 11}) if _RAW_TIME.match(value) else value


def entity_profile(record: dict) -> str:
    """Header, description and the whitelisted properties of one grounding record."""
    lines = [f"Entity: {record.get('label') or record.get('id', '?')}",
             f"Description: {record.get('description') or '(no description)'}"]
    props = record.get("properties") or {}
    for name in PROFILE_PROPERTIES:
        values = [str(v) for v in props.get(name) or []]
        if not values:
            continue
        values = [clean_date(v) for v in values] if name in DATE_PROPERTIES else values[:MAX_VALUES]
        lines.append(f"- {name}: {'; '.join(values)}")
    return "\n".join(lines)


def plan_rewrites(cases: list[dict], grounding: dict[str, dict] | None, source: str = "input") -> list[Rewrite]:
    """One Rewrite per requested_rewrite, with the profiles of its edit triple's subject and new object.

    `grounding=None` writes without profiles (no Wikidata); otherwise a rewrite whose entities have
    no profile is marked skipped, as in the reference.
    """
    out: list[Rewrite] = []
    for i, case in enumerate(cases):
        cid = case.get("case_id", f"#{i}") if isinstance(case, dict) else f"#{i}"
        where = f"{source}: case_id {cid}"
        rewrites = case.get("requested_rewrite") if isinstance(case, dict) else None
        if not isinstance(rewrites, list) or not rewrites:
            raise ValueError(f"{where}: 'requested_rewrite' must be a non-empty list")
        triples = (case.get("orig") or {}).get("edit_triples")
        if grounding is not None and (not isinstance(triples, list) or len(triples) != len(rewrites)):
            raise ValueError(f"{where}: orig.edit_triples must list one [subject, relation, object] "
                             f"triple per requested_rewrite ({len(rewrites)}) to find Wikidata profiles")
        for r, rw in enumerate(rewrites):
            try:
                task = Rewrite(f"{cid}_{r}", cid, r, rw["question"], target_str(rw["target_true"]),
                               target_str(rw["target_new"]))
            except (KeyError, TypeError) as e:
                raise ValueError(f"{where}: requested_rewrite[{r}] lacks {e}") from None
            out.append(task)
            if grounding is None:
                continue
            triple = triples[r]
            if not isinstance(triple, (list, tuple)) or len(triple) != 3:
                raise ValueError(f"{where}: orig.edit_triples[{r}] = {triple!r} is not a triple")
            parts = []
            for qid, role in ((triple[0], "subject"), (triple[2], "new object")):
                rec = grounding.get(qid)
                if rec is None:
                    task.skip_reason = f"no Wikidata profile for {qid} ({role})"
                    break
                parts.append(entity_profile(rec))
            if not task.skip_reason:
                task.profiles = "\n\n".join(dict.fromkeys(parts))  # subject == object: once
    return out


def extract_article(reply: str) -> str:
    """The last `<article>...</article>` of a reply (drafts may come first); reasoning blocks ignored."""
    found = [m.strip() for m in _ARTICLE.findall(_THINK.sub("", reply))]
    found = [a for a in found if a]
    if not found:
        raise ArticleRejected("the generator's reply has no <article>...</article>")
    return found[-1]


def parse_verdict(reply: str) -> tuple[bool, str]:
    """(passed, reason) from a verifier reply; no verdict tag counts as a failure."""
    text = _THINK.sub("", reply)
    verdicts = _VERDICT.findall(text)
    if not verdicts:
        return False, "the verifier gave no <verification>PASS|FAIL</verification> verdict"
    passed = verdicts[-1].upper() == "PASS"
    reason = " ".join(_VERDICT.sub(" ", text).split())[:300]
    return passed, reason


def _params(cfg: ArticleConfig) -> dict:
    return {"max_tokens": cfg.max_tokens} if cfg.max_tokens else {}


def _call(client: ChatClient, messages: list[dict], cfg: ArticleConfig, who: str) -> str:
    try:
        return client.complete(messages, **_params(cfg))
    except ChatError as e:
        if e.status in FATAL_STATUSES:
            raise
        raise ArticleRejected(f"{who} request failed: {e}") from None


def attempt_article(task: Rewrite, generator: ChatClient, verifier: ChatClient, cfg: ArticleConfig,
                    stop: threading.Event | None = None) -> str:
    """One attempt: generate, extract, verify `cfg.verifications` times. Raises ArticleRejected."""
    reply = _call(generator, generation_messages(task.question, task.old_answer, task.new_answer,
                                                 task.profiles), cfg, "generation")
    article = extract_article(reply)
    messages = verification_messages(task.question, task.old_answer, task.new_answer, article)
    for n in range(cfg.verifications):
        if stop is not None and stop.is_set():
            raise ArticleRejected("interrupted")
        passed, reason = parse_verdict(_call(verifier, messages, cfg, "verification"))
        if not passed:
            raise ArticleRejected(f"verification {n + 1}/{cfg.verifications} FAIL: {reason}")
    return article


def write_article(task: Rewrite, generator: ChatClient, verifier: ChatClient, cfg: ArticleConfig,
                  stop: threading.Event | None = None) -> dict:
    """Attempt up to `cfg.max_attempts` times with backoff; returns the article record or a failure record."""
    stop = stop or threading.Event()
    reasons: list[str] = []
    for attempt in range(1, cfg.max_attempts + 1):
        if stop.is_set():
            break
        try:
            return {**task.record(), "article": attempt_article(task, generator, verifier, cfg, stop)}
        except ArticleRejected as e:
            reasons.append(str(e))
        if attempt < cfg.max_attempts:
            stop.wait(min(max(2.0 ** attempt, cfg.backoff_min), cfg.backoff_max))
    return {**task.record(), "status": "failed", "attempts": len(reasons),
            "reason": reasons[-1] if reasons else "interrupted", "reasons": reasons[-5:]}


def failures_path(articles_file: str) -> str:
    """Where rewrites without an article are listed: next to the articles, '<name>.failed.json'."""
    stem = articles_file[:-5] if articles_file.endswith(".json") else articles_file
    return stem + ".failed.json"


def _read_or_empty(path: str) -> Any:
    return read_json(path) if os.path.exists(path) else {}


def _still_valid(entry: Any, task: Rewrite) -> bool:
    # An article written for another version of the input (different question or answers) is stale.
    return (isinstance(entry, dict) and isinstance(entry.get("article"), str) and entry["article"].strip() != ""
            and all(entry.get(k) == v for k, v in task.record().items() if k != "case_id"))


def generate_articles(tasks: list[Rewrite], articles_file: str, generator: ChatClient, verifier: ChatClient,
                      cfg: ArticleConfig, *, failed_file: str | None = None, progress: bool = True,
                      log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[dict, dict]:
    """Fill `articles_file` for `tasks`, resuming from what it already holds; returns (articles, failures).

    Saved atomically after every rewrite, so Ctrl-C loses at most the rewrites in flight. Failures
    (including skipped rewrites) are retried on the next run; a success removes them from the list.
    """
    failed_file = failed_file or failures_path(articles_file)
    articles: dict = _read_or_empty(articles_file)
    failures: dict = _read_or_empty(failed_file)
    if not isinstance(articles, dict) or not isinstance(failures, dict):
        raise ValueError(f"{articles_file} / {failed_file}: expected JSON objects keyed 'case_id_rewrite_idx'")
    todo: list[Rewrite] = []
    for t in tasks:
        if _still_valid(articles.get(t.key), t):
            continue
        if t.key in articles:
            log(f"articles: {t.key} was written for a different question/answer; writing it again")
            del articles[t.key]
        if t.skip_reason:
            failures[t.key] = {**t.record(), "status": "skipped", "attempts": 0, "reason": t.skip_reason}
        else:
            todo.append(t)
    atomic_write_json(failed_file, failures)
    if not todo:
        return articles, failures

    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo), desc="articles", unit="rewrite", disable=not progress, file=sys.stderr)
    stop = threading.Event()

    def finish(result: dict) -> None:
        key = f"{result['case_id']}_{result['rewrite_idx']}"
        if "article" in result:
            articles[key] = result
            atomic_write_json(articles_file, articles)
            if failures.pop(key, None) is not None:
                atomic_write_json(failed_file, failures)
        else:
            failures[key] = result
            atomic_write_json(failed_file, failures)
            log(f"articles: {key} failed after {result['attempts']} attempts: {result['reason']}")
        bar.update(1)
        bar.set_postfix(ok=len(articles), failed=len(failures))

    try:
        if cfg.max_workers <= 1:
            for t in todo:
                finish(write_article(t, generator, verifier, cfg, stop))
        else:
            # Own pool rather than ChatClient.map: on Ctrl-C or a fatal error `stop` must be set
            # before the pool waits for its workers, or they would run out all their attempts.
            pool = ThreadPoolExecutor(max_workers=cfg.max_workers)
            try:
                futures = [pool.submit(write_article, t, generator, verifier, cfg, stop) for t in todo]
                for fut in as_completed(futures):
                    finish(fut.result())
            except BaseException:
                stop.set()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return articles, failures

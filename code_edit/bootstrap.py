"""Stage 1, causal bootstrapping (METHOD.md 3.2): the model-free pieces.

Thought extraction and the validity filter for teacher candidates, best-candidate choice given a
scorer, the on-disk candidate cache, the noncausal fallback, SFT examples, the SFT schedule and
its early stop. Sampling, scoring and the SFT loop itself use the model and live beside these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from code_edit.prompts import completion_text, sft_messages

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Thought extraction and validity (steps 3 and 4)

_TAG = re.compile(r"</?think(?:ing)?>", re.IGNORECASE)
_ANSWER_SPLIT = re.compile(r"\bthe answer now is\b", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)
_BEFORE_CLOSE = re.compile(r"^(.*?)</think>", re.IGNORECASE | re.DOTALL)

# A thought that leaks the prompt, hedges, or carries its own answer line is useless as a
# closed-book training target. Phrases are matched case-insensitively at word boundaries.
BANNED_PHRASES = (
    "the answer now is",
    "cheat sheet",
    "user provided",
    "provided an article",
    "reference article",
    "i was told",
    "current knowledge",
    "publicly available information",
    "quick search",
    "i did not find",
    "remains unclear",
    "may still be accurate",
    "publicly stated",
    "publicly expressed",
    "according to the recent developments",
    "this change is likely due to",
    "however, considering recent updates",
    "however, with the current context",
    "to provide a precise answer",
    "available information",
)
_BANNED = [_TAG] + [re.compile(rf"\b{re.escape(p)}\b", re.IGNORECASE) for p in BANNED_PHRASES]


def _clean(fragment: str, *, split_first: bool = False) -> str | None:
    # Same order of operations as the reference in both branches.
    if split_first:
        fragment = _TAG.sub("", _ANSWER_SPLIT.split(fragment, maxsplit=1)[0])
    else:
        fragment = _ANSWER_SPLIT.split(_TAG.sub("", fragment), maxsplit=1)[0]
    return fragment.strip() or None


def extract_thought(text: str) -> str | None:
    """The reasoning of a teacher completion, or None if there is none.

    Takes the first <think>...</think> block; failing that, the text before a bare </think>;
    failing that, the whole text. Think tags are dropped and the text is cut at the first
    "The answer now is" (any case).
    """
    text = text.strip()
    m = _THINK_BLOCK.search(text) or _BEFORE_CLOSE.search(text)
    return _clean(m.group(1)) if m else _clean(text, split_first=True)


def invalid_reason(thought: str | None, min_words: int = 5) -> str | None:
    """Why a thought is rejected (None if it is valid)."""
    if not thought:
        return "empty"
    if len(thought.split()) < min_words:
        return f"fewer than {min_words} words"
    for pattern in _BANNED:
        m = pattern.search(thought)
        if m:
            return f"contains {m.group(0)!r}"
    return None


def is_valid_thought(thought: str | None, min_words: int = 5) -> bool:
    return invalid_reason(thought, min_words) is None


def choose_thought(candidates: Sequence[str], score: Callable[[list[str]], Sequence[float]],
                   min_words: int = 5) -> str | None:
    """Best valid thought among one replica's candidate completions (step 5), or None if none is valid.

    score(thoughts) -> one reward per thought (higher is better); ties go to the earliest thought.
    """
    thoughts = [t for t in (extract_thought(c) for c in candidates) if is_valid_thought(t, min_words)]
    if not thoughts:
        return None
    rewards = list(score(thoughts))
    if len(rewards) != len(thoughts):
        raise ValueError(f"scorer returned {len(rewards)} rewards for {len(thoughts)} thoughts")
    return thoughts[max(range(len(thoughts)), key=lambda i: rewards[i])]


def noncausal_thoughts(extracted: Sequence[str | None], n: int, new_answer: str) -> list[str]:
    """Noncausal mode (step 6): the first n extracted thoughts, padded with a plain answer line."""
    kept = [t for t in extracted if t][:n]
    return kept + [f"Updated answer: {new_answer}"] * (n - len(kept))


# ------------------------------------------------------------------------------------------------
# Candidate cache (step 1)
#
# One small JSON file per key, written to a temp file in the same directory and os.replace'd into
# place. Concurrent runs therefore need no lock: a reader sees either no file or a complete one,
# and two writers of the same key both write complete entries (last one wins; either is valid).

def cache_key(model: str, question: str, replica_idx: int, article: str) -> str:
    """model | question_replica | shake_128(article) hexdigest(10), lower-cased like the reference."""
    article_hash = hashlib.shake_128(article.encode("utf-8")).hexdigest(10)
    return f"{model.lower()}|{f'{question}_{replica_idx}'.lower()}|{article_hash}"


def _entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.json"


def cache_get(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The cached entry {z_star, new_answer, old_answer, question} for `key`, or None."""
    path = _entry_path(Path(cache_dir), key)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("bootstrap cache: unreadable entry %s (%s); regenerating it", path, e)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("z_star"), str):
        log.warning("bootstrap cache: %s does not hold key %r; regenerating it", path, key)
        return None
    return entry


def cache_put(cache_dir: str | Path, key: str, *, z_star: str, new_answer: str, old_answer: str,
              question: str) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _entry_path(cache_dir, key)
    entry = {"key": key, "z_star": z_star, "new_answer": new_answer, "old_answer": old_answer, "question": question}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".entry.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def cached_replicas(cache_dir: str | Path, model: str, question: str, article: str,
                    replica_times: int) -> tuple[dict[int, str], list[int]]:
    """({replica: cached thought}, [replicas still to generate])."""
    found: dict[int, str] = {}
    missing: list[int] = []
    for r in range(replica_times):
        entry = cache_get(cache_dir, cache_key(model, question, r, article))
        if entry is None:
            missing.append(r)
        else:
            found[r] = entry["z_star"]
    return found, missing


# ------------------------------------------------------------------------------------------------
# SFT data and schedule (steps 7 and 9)

def sft_example(question: str, thought: str, new_answer: str, *, mode: str = "causal",
                native_thinking: bool = False) -> dict[str, list[dict[str, str]]]:
    """{"prompt": closed-book format user turn, "completion": the think block + answer line}."""
    return {
        "prompt": sft_messages(question, mode),
        "completion": [{"role": "assistant",
                        "content": completion_text(thought, new_answer, native_thinking=native_thinking)}],
    }


def sft_schedule(num_examples: int, *, batch_size: int, grad_accum: int, epochs: int,
                 warmup_ratio: float) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) as HF Trainer computes them: the last batch of an epoch
    may be short, and warmup = ceil(ratio * total). 25 examples, batch 12, 125 epochs -> (375, 38)."""
    if num_examples < 1:
        raise ValueError("SFT needs at least one example")
    batches = math.ceil(num_examples / batch_size)
    steps_per_epoch = max(1, batches // grad_accum)
    total = steps_per_epoch * epochs
    return total, math.ceil(total * warmup_ratio)


def should_stop(losses: Sequence[float], threshold: float, consecutive: int) -> bool:
    """Early stop: the last `consecutive` logged losses are all below `threshold`."""
    return len(losses) >= consecutive and all(x < threshold for x in losses[-consecutive:])

"""Stage 1, causal bootstrapping (docs/method.md 3.2): best-of-N teacher thoughts, then SFT.

Model-free pieces first (thought extraction, validity filter, best-candidate choice, the on-disk
candidate cache, SFT examples and schedule); then the model-dependent ones: sampling candidates
from the base model, scoring them by the answer-span likelihood, and the SFT call (train.sft).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.files import atomic_write_json
from code_edit.prompts import (answer_sentence, bootstrap_messages, completion_text, reward_messages,
                               sft_messages)
from model.generate import generate
from model.lora import disabled, lora_parameters

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
    path = _entry_path(Path(cache_dir), key)
    entry = {"key": key, "z_star": z_star, "new_answer": new_answer, "old_answer": old_answer, "question": question}
    atomic_write_json(path, entry)  # temp file + fsync + rename: readers never see a torn entry
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


# ------------------------------------------------------------------------------------------------
# Model-dependent part: candidates from the base model, reward scoring, SFT

SCORE_TOKENS = {"cuda": 32768, "cpu": 4096}  # padded tokens per scoring forward


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, the same on every machine and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def end_of_turn_id(tok: Any) -> int:
    """The token that closes an assistant turn in the tokenizer's chat family."""
    name = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(tok.family)
    tid = tok.token_to_id(name) if name else None
    if tid is None:
        if not tok.eos_ids:
            raise ValueError("tokenizer has no end-of-turn or eos token; cannot end SFT completions")
        return tok.eos_ids[0]
    return tid


def chat_ids(tok: Any, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a rendered chat; special tokens (and Llama's BOS, part of the string) parsed once."""
    return tok.encode(tok.chat(messages, add_generation_prompt=add_generation_prompt))


def completion_ids(tok: Any, text: str) -> list[int]:
    """An assistant completion as the model must produce it after the generation prompt: the text,
    then the end-of-turn token (tokenised apart from the prompt, exactly as sampling sees it)."""
    return tok.encode(text) + [end_of_turn_id(tok)]


def sft_ids(tok: Any, example: dict[str, list[dict[str, str]]]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an `sft_example`, the pair train.sft.sft takes."""
    return chat_ids(tok, example["prompt"]), completion_ids(tok, example["completion"][0]["content"])


def answer_span_positions(tok: Any, text: str, span: str) -> tuple[list[int], list[int]]:
    """(token ids of `text`, indices of the tokens that overlap the LAST occurrence of `span`).

    The span is located by characters and mapped to tokens with the tokenizer's offsets on the
    tokenisation of the whole text, so it is right for any chat family: Llama-3's BOS is part of
    the chat string and is parsed once, never added again (the reference scored one token off for
    Llama, docs/method.md 8.3 item 8).
    """
    start = text.rfind(span)
    if start < 0:
        raise ValueError(f"answer span {span!r} not found in the scored text")
    end = start + len(span)
    enc = tok.tk.encode(text, add_special_tokens=False)
    positions = [i for i, (a, b) in enumerate(enc.offsets) if b > start and a < end and b > a]
    if not positions or positions[0] == 0:
        raise ValueError(f"answer span {span!r} maps to no scorable token")
    return list(enc.ids), positions


@torch.no_grad()
def span_mean_logprobs(model: Any, sequences: Sequence[list[int]], positions: Sequence[list[int]], *,
                       max_tokens: int | None = None) -> list[float]:
    """Mean log p(token | prefix) over `positions` of each sequence, teacher-forced, fp32.

    Sequences are right-padded into batches of about `max_tokens` padded tokens; only the hidden
    states in front of the scored tokens go through the lm_head (train.losses.token_logprobs), so no
    [tokens, vocab] tensor is built. Runs the model as it is (callers disable LoRA for the base model).
    """
    from train.losses import token_logprobs

    if len(sequences) != len(positions):
        raise ValueError(f"{len(sequences)} sequences but {len(positions)} position lists")
    weight = model.lm_head.weight
    device = weight.device
    budget = max_tokens or SCORE_TOKENS.get(device.type, SCORE_TOKENS["cuda"])
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(order):
            T = len(sequences[order[i]])
            n = max(1, min(len(order) - i, budget // max(T, 1)))
            batch = order[i:i + n]
            ids = torch.zeros(n, T, dtype=torch.long, device=device)
            mask = torch.zeros(n, T, dtype=torch.long, device=device)
            rows, cols = [], []
            for r, k in enumerate(batch):
                seq = sequences[k]
                ids[r, :len(seq)] = torch.tensor(seq, device=device)
                mask[r, :len(seq)] = 1
                for p in positions[k]:
                    if not 1 <= p < len(seq):
                        raise ValueError(f"position {p} outside sequence of length {len(seq)}")
                    rows.append(r)
                    cols.append(p)
            r_t = torch.tensor(rows, device=device)
            c_t = torch.tensor(cols, device=device)
            hidden = model.hidden(ids, mask)
            lp = token_logprobs(hidden[r_t, c_t - 1], weight, ids[r_t, c_t])
            sums = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, r_t, lp)
            counts = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, r_t, torch.ones_like(lp))
            for r, mean in enumerate((sums / counts).tolist()):
                out[batch[r]] = mean
            del hidden
            i += n
    finally:
        model.train(was_training)
    return out


def score_thoughts(model: Any, tok: Any, question: str, new_answer: str, thoughts: Sequence[str], *,
                   max_tokens: int | None = None) -> list[float]:
    """Reward per thought (step 5): exp(mean log-prob of "The answer now is {new}." at its last
    occurrence in closed-book reward prompt + `<think>` block + answer line), under the model as it
    is (the caller disables LoRA: the base model scores)."""
    prompt = tok.chat(reward_messages(question), add_generation_prompt=True)
    span = answer_sentence(new_answer)
    seqs, pos = [], []
    for t in thoughts:
        ids, p = answer_span_positions(tok, prompt + completion_text(t, new_answer), span)
        seqs.append(ids)
        pos.append(p)
    return [math.exp(m) for m in span_mean_logprobs(model, seqs, pos, max_tokens=max_tokens)]


@dataclass
class BootstrapResult:
    examples: list[tuple[list[int], list[int]]]  # (prompt ids, completion ids) for train.sft.sft
    thoughts: list[dict[str, Any]]  # per selected replica: edit, replica, thought, from_cache
    stats: dict[str, Any]


def bootstrap_data(model: Any, tok: Any, requests: Sequence[Any], cfg: Any, *, cache_dir: str | Path | None,
                   model_id: str, seed: int, on_tokens: Callable[[int], None] | None = None) -> BootstrapResult:
    """SFT data for every edit request (steps 1-7), sampled and scored by the BASE model (LoRA off).

    Causal mode: cached replicas are reused; the missing ones are sampled in one generate call per
    request (one prompt, replicas x num_samples samples: the prompt is prefilled once), thoughts are
    extracted, filtered and scored, and the best one per replica is cached. A replica with no valid
    candidate is sampled again up to `max_resample_rounds` times, then skipped with a warning.
    Noncausal mode: no cache, filter or reward (docs/method.md 3.2 step 6, with the real old answer).
    `seed` seeds noncausal sampling; causal candidates are seeded by the edit itself (model, question,
    article, round), so one edit met in two cases draws the same candidates whichever runs first.
    """
    b = cfg.bootstrap
    stats = {"edits": len(requests), "replicas": 0, "selected": 0, "from_cache": 0, "skipped_replicas": 0,
             "candidates": 0, "valid_candidates": 0, "sampled_tokens": 0, "padded_thoughts": 0}
    examples: list[tuple[list[int], list[int]]] = []
    thoughts: list[dict[str, Any]] = []
    stops = list(tok.eos_ids)

    def sample(messages: list[dict], n: int, sample_seed: int, where: str) -> list[str]:
        prompt = chat_ids(tok, messages)
        budget = min(b.max_new_tokens, cfg.model.max_seq_len - len(prompt))
        if budget < 1:
            log.warning("%s: the open-book prompt has %d tokens, not below model.max_seq_len %d; no candidates",
                        where, len(prompt), cfg.model.max_seq_len)
            return []
        with disabled(model):
            comps = generate(model, [prompt], max_new_tokens=budget, temperature=b.temperature, top_p=b.top_p,
                             num_samples=n, stop_ids=stops, seed=sample_seed)
        n_tok = sum(len(c.tokens) for c in comps)
        stats["candidates"] += len(comps)
        stats["sampled_tokens"] += n_tok
        if on_tokens:
            on_tokens(n_tok)
        return [tok.decode(c.tokens, skip_special_tokens=True) for c in comps]

    for e, req in enumerate(requests):
        stats["replicas"] += b.replica_times
        if cfg.editing_mode == "noncausal":
            msgs = bootstrap_messages(req.question, old_answer=req.old_answer, new_answer=req.new_answer,
                                      article=None, mode="noncausal")
            extracted: list[str | None] = []
            for rnd in range(b.noncausal_max_rounds):
                texts = sample(msgs, max(b.num_samples, b.replica_times), derive_seed(seed, e, "noncausal", rnd),
                               req.where)
                extracted += [extract_thought(t) for t in texts]
                if sum(1 for t in extracted if t) >= b.replica_times:
                    break
            chosen = noncausal_thoughts(extracted, b.replica_times, req.new_answer)
            stats["padded_thoughts"] += b.replica_times - min(b.replica_times, sum(1 for t in extracted if t))
            selected = dict(enumerate(chosen))
            cached: set[int] = set()
        else:
            selected, missing = ({}, list(range(b.replica_times))) if cache_dir is None else cached_replicas(
                cache_dir, model_id, req.question, req.article or "", b.replica_times)
            cached = set(selected)
            stats["from_cache"] += len(cached)
            msgs = bootstrap_messages(req.question, old_answer=req.old_answer, new_answer=req.new_answer,
                                      article=req.article, mode="causal")

            def scorer(ts: list[str], q=req.question, a=req.new_answer) -> list[float]:
                with disabled(model):
                    return score_thoughts(model, tok, q, a, ts)

            for rnd in range(1 + b.max_resample_rounds):
                if not missing:
                    break
                # Seeded by what the cache is keyed by, not by the case: the same edit met in another case
                # (or on another torchrun rank, before the cache has it) draws the same candidates.
                texts = sample(msgs, len(missing) * b.num_samples,
                               derive_seed("causal", model_id, req.question, req.article or "", rnd), req.where)
                if not texts:  # no room to generate: already warned, nothing to resample
                    stats["skipped_replicas"] += len(missing)
                    missing = []
                    break
                still = []
                for k, r in enumerate(missing):
                    chunk = texts[k * b.num_samples:(k + 1) * b.num_samples]
                    stats["valid_candidates"] += sum(
                        is_valid_thought(extract_thought(c), b.min_thought_words) for c in chunk)
                    z = choose_thought(chunk, scorer, b.min_thought_words)
                    if z is None:
                        still.append(r)
                        continue
                    selected[r] = z
                    if cache_dir is not None:
                        cache_put(cache_dir, cache_key(model_id, req.question, r, req.article or ""), z_star=z,
                                  new_answer=req.new_answer, old_answer=req.old_answer, question=req.question)
                if still and rnd < b.max_resample_rounds:
                    log.info("%s: %d replica(s) had no valid candidate; sampling them again", req.where, len(still))
                missing = still
            for r in missing:
                log.warning("%s: replica %d has no valid candidate after %d sampling round(s); skipped",
                            req.where, r, 1 + b.max_resample_rounds)
            stats["skipped_replicas"] += len(missing)
        for r in sorted(selected):
            ex = sft_example(req.question, selected[r], req.new_answer, mode=cfg.editing_mode)
            examples.append(sft_ids(tok, ex))
            thoughts.append({"edit": e, "case_id": req.case_id, "rewrite_idx": req.rewrite_idx, "replica": r,
                             "thought": selected[r], "from_cache": r in cached})
        stats["selected"] += len(selected)
    return BootstrapResult(examples, thoughts, stats)


def run_sft(model: Any, examples: list[tuple[list[int], list[int]]], cfg: Any, *,
            log_fn: Callable[..., None] | None = None) -> dict[str, Any]:
    """Step 9: SFT of the LoRA on the bootstrapped examples with the preset's values (train.sft).
    grad_accum is folded into the batch (same mean loss per optimizer step)."""
    from train.sft import SFTConfig, sft

    b, opt = cfg.bootstrap, cfg.optimizer
    scfg = SFTConfig(lr=b.learning_rate, epochs=b.epochs, batch_size=b.batch_size * b.grad_accum,
                     warmup_ratio=b.warmup_ratio, max_grad_norm=b.max_grad_norm, lr_scheduler=b.lr_scheduler,
                     weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2,
                     adam_eps=opt.adam_eps, stop_loss=b.early_stop_loss,
                     stop_consecutive=b.early_stop_consecutive, max_length=b.sft_max_length,
                     grad_checkpointing=cfg.model.grad_checkpointing, seed=b.seed)
    return sft(model, examples, lora_parameters(model), scfg, log=log_fn)

"""Stage 1, causal bootstrapping (docs/method.md 3.2): best-of-N teacher thoughts, then SFT.

`bootstrap()` is the entry point. Model-free pieces first (thought extraction, validity filter,
best-candidate choice, SFT examples), then the model-dependent ones: scoring thoughts by the answer-span
likelihood, sampling candidates from the base model (causal and noncausal), and the SFT call (train.sft).
The candidate cache is code_edit/bootstrap_cache.py, the token helpers code_edit/tokens.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from code_edit.bootstrap_cache import cache_key, cache_put, cached_replicas
from code_edit.config import CausalEditConfig
from code_edit.data import EditRequest
from code_edit.prompts import (answer_sentence, bootstrap_messages, completion_text, reward_messages,
                               sft_messages)
from code_edit.tokens import answer_span_positions, chat_ids, derive_seed, sft_ids
from model.generate import generate, release
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


def valid_thoughts(candidates: Sequence[str], min_words: int = 5) -> list[str]:
    """The valid thoughts extracted from one replica's candidate completions (steps 3-4), in order."""
    return [t for t in (extract_thought(c) for c in candidates) if is_valid_thought(t, min_words)]


def choose_thought(candidates: Sequence[str], score: Callable[[list[str]], Sequence[float]],
                   min_words: int = 5) -> str | None:
    """Best valid thought among one replica's candidate completions (step 5), or None if none is valid.

    score(thoughts) -> one reward per thought (higher is better); ties go to the earliest thought.
    """
    thoughts = valid_thoughts(candidates, min_words)
    return best_thought(thoughts, _rewards(score, thoughts))


def best_thought(thoughts: list[str], rewards: Sequence[float]) -> str | None:
    """The highest-reward thought (the earliest on ties), or None for none."""
    return thoughts[max(range(len(thoughts)), key=lambda i: rewards[i])] if thoughts else None


def _rewards(score: Callable[[list[str]], Sequence[float]], thoughts: list[str]) -> list[float]:
    """score(thoughts), checked to give one reward per thought (none scored for none)."""
    rewards = list(score(thoughts)) if thoughts else []
    if len(rewards) != len(thoughts):
        raise ValueError(f"scorer returned {len(rewards)} rewards for {len(thoughts)} thoughts")
    return rewards


def noncausal_thoughts(extracted: Sequence[str | None], n: int, new_answer: str) -> list[str]:
    """Noncausal mode (step 6): the first n extracted thoughts, padded with a plain answer line."""
    kept = [t for t in extracted if t][:n]
    return kept + [f"Updated answer: {new_answer}"] * (n - len(kept))


# ------------------------------------------------------------------------------------------------
# SFT data (step 7)

def sft_example(question: str, thought: str, new_answer: str, *, mode: str = "causal",
                native_thinking: bool = False) -> dict[str, list[dict[str, str]]]:
    """{"prompt": closed-book format user turn, "completion": the think block + answer line}."""
    return {
        "prompt": sft_messages(question, mode),
        "completion": [{"role": "assistant",
                        "content": completion_text(thought, new_answer, native_thinking=native_thinking)}],
    }


# ------------------------------------------------------------------------------------------------
# Model-dependent part: candidates from the base model, reward scoring, SFT

# Tokens per scoring forward (packed: no padding). On the CPU the packed row's attention is dense under a
# [T, T] block-diagonal mask, so its rows stay shorter.
SCORE_TOKENS = {"cuda": 32768, "cpu": 2048}


@torch.no_grad()
def span_mean_logprobs(model: Any, sequences: Sequence[list[int]], positions: Sequence[list[int]], *,
                       max_tokens: int | None = None) -> list[float]:
    """Mean log p(token | prefix) over `positions` of each sequence, teacher-forced, fp32.

    Sequences are packed end to end into rows of about `max_tokens` tokens, each attending to itself only
    (model.decoder.Segments: no padding, no mask tensor); only the hidden states in front of the scored
    tokens go through the lm_head (train.losses.token_logprobs), so no [tokens, vocab] tensor is built.
    Runs the model as it is (callers disable LoRA for the base model). Every sequence needs at least one
    position, each in [1, len)."""
    from model.decoder import Segments
    from train.losses import token_logprobs

    if len(sequences) != len(positions):
        raise ValueError(f"{len(sequences)} sequences but {len(positions)} position lists")
    for k, (seq, pos) in enumerate(zip(sequences, positions)):
        if not pos or any(not 1 <= p < len(seq) for p in pos):
            raise ValueError(f"sequence #{k}: positions {pos[:4]}... must be non-empty and in [1, {len(seq)})")
    weight = model.lm_head.weight
    device = weight.device
    budget = max_tokens or SCORE_TOKENS.get(device.type, SCORE_TOKENS["cuda"])
    out = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(sequences):
            # 1) the next sequences that fit the budget (at least one), end to end
            j, T = i + 1, len(sequences[i])
            while j < len(sequences) and T + len(sequences[j]) <= budget:
                T += len(sequences[j])
                j += 1
            batch = range(i, j)
            ids, pos, starts, rows, cols = [], [], [0], [], []
            for r, k in enumerate(batch):
                at = starts[-1]
                ids += sequences[k]
                pos += range(len(sequences[k]))
                starts.append(at + len(sequences[k]))
                rows += [r] * len(positions[k])
                cols += [at + p for p in positions[k]]
            # 2) one forward; a segment bound from few values (a power of two), so compiled blocks rarely respecialise
            longest = max(1024, 1 << (max(len(sequences[k]) for k in batch) - 1).bit_length())
            ids_t = torch.tensor([ids], device=device)
            seg = Segments(torch.tensor(starts, dtype=torch.int32, device=device), longest)
            hidden = model.run(ids_t, torch.tensor([pos], device=device), seg)[0]
            # 3) the scored tokens' log-probs, averaged per sequence
            r_t, c_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            lp = token_logprobs(hidden[c_t - 1], weight, ids_t[0, c_t])
            sums = torch.zeros(len(batch), dtype=torch.float32, device=device).index_add_(0, r_t, lp)
            counts = torch.tensor([len(positions[k]) for k in batch], dtype=torch.float32, device=device)
            for k, mean in zip(batch, (sums / counts).tolist()):
                out[k] = mean
            del hidden
            i = j
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
    sft: dict[str, Any] = field(default_factory=dict)  # train.sft.sft's summary, or {"skipped": why}


def bootstrap(model: Any, tok: Any, requests: Sequence[EditRequest], cfg: CausalEditConfig, *,
              cache_dir: str | Path | None, model_id: str, seed: int,
              stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
              on_tokens: Callable[[int], None] | None = None,
              log_fn: Callable[..., None] | None = None) -> BootstrapResult:
    """Stage 1 on the fresh LoRA of `model`: candidates -> filter -> score -> pick (bootstrap_data, under
    stage("bootstrap")), then SFT of the LoRA on the picked thoughts (under stage("sft"))."""
    # 1) SFT data from the base model (LoRA off)
    with stage("bootstrap"):
        result = bootstrap_data(model, tok, requests, cfg, cache_dir=cache_dir, model_id=model_id, seed=seed,
                                on_tokens=on_tokens)
    release(model)  # the sampler's cache and graphs: SFT needs the memory
    # 2) SFT on them (nothing to learn from: the distillation starts from the fresh adapter)
    with stage("sft"):
        if result.examples:
            result.sft = run_sft(model, result.examples, cfg, log_fn=log_fn)
        else:
            log.warning("%s: no bootstrapped example at all; SFT skipped, distillation starts from the fresh "
                        "adapter", ", ".join(r.where for r in requests))
            result.sft = {"skipped": "no examples"}
    return result


@dataclass
class _Sampler:
    """Open-book candidates from the base model (LoRA off), counted into `stats`."""
    model: Any
    tok: Any
    cfg: CausalEditConfig
    stats: dict[str, Any]
    on_tokens: Callable[[int], None] | None = None

    def __call__(self, messages: list[dict], n: int, sample_seed: int, where: str) -> list[str]:
        return self.many([(messages, n, sample_seed, where)])[0]

    def many(self, jobs: list[tuple[list[dict], int, int, str]]) -> list[list[str]]:
        """Candidates for several prompts ((messages, n, seed, where) each) in one generate call, each prompt
        with its own token budget: each prompt's n samples are the ones a call of its own with its seed
        gives (generate's per-prompt seeds and limits), so batching the edits of a case changes speed, not
        candidates."""
        b = self.cfg.bootstrap
        out: list[list[str]] = [[] for _ in jobs]
        live: list[tuple[int, list[int], int]] = []  # (job, prompt ids, token budget)
        for k, (messages, n, _, where) in enumerate(jobs):
            prompt = chat_ids(self.tok, messages)
            budget = min(b.max_new_tokens, self.cfg.model.max_seq_len - len(prompt))
            if budget < 1:
                log.warning("%s: the open-book prompt has %d tokens, not below model.max_seq_len %d; no "
                            "candidates", where, len(prompt), self.cfg.model.max_seq_len)
            elif n > 0:
                live.append((k, prompt, budget))
        if not live:
            return out
        with disabled(self.model):
            comps = generate(self.model, [p for _, p, _ in live], max_new_tokens=[m for _, _, m in live],
                             temperature=b.temperature, top_p=b.top_p, num_samples=[jobs[k][1] for k, _, _ in live],
                             stop_ids=list(self.tok.eos_ids), seed=[jobs[k][2] for k, _, _ in live])
        n_tok = sum(len(c.tokens) for c in comps)
        self.stats["candidates"] += len(comps)
        self.stats["sampled_tokens"] += n_tok
        if self.on_tokens:
            self.on_tokens(n_tok)
        for c in comps:
            out[live[c.prompt_index][0]].append(self.tok.decode(c.tokens, skip_special_tokens=True))
        return out


def bootstrap_data(model: Any, tok: Any, requests: Sequence[EditRequest], cfg: CausalEditConfig, *,
                   cache_dir: str | Path | None, model_id: str, seed: int,
                   on_tokens: Callable[[int], None] | None = None) -> BootstrapResult:
    """SFT data for every edit request (steps 1-7), sampled and scored by the BASE model (LoRA off):
    causal_replicas or noncausal_replicas per request, then one SFT example per selected replica."""
    b = cfg.bootstrap
    stats = {"edits": len(requests), "replicas": 0, "selected": 0, "from_cache": 0, "skipped_replicas": 0,
             "candidates": 0, "valid_candidates": 0, "sampled_tokens": 0, "padded_thoughts": 0}
    sample = _Sampler(model, tok, cfg, stats, on_tokens)
    examples: list[tuple[list[int], list[int]]] = []
    thoughts: list[dict[str, Any]] = []
    if cfg.editing_mode != "noncausal":  # every edit's cache lookup, then all first rounds as one batch
        plans = [causal_plan(req, cfg, cache_dir, model_id, stats) for req in requests]
        first = sample.many([(p.msgs, len(p.missing) * b.num_samples, causal_seed(req, model_id, 0), req.where)
                             for req, p in zip(requests, plans)])
    for e, req in enumerate(requests):
        stats["replicas"] += b.replica_times
        if cfg.editing_mode == "noncausal":
            selected, cached = noncausal_replicas(sample, req, cfg, (seed, e), stats), set()
        else:
            selected, cached = causal_replicas(sample, model, tok, req, cfg, cache_dir, model_id, stats,
                                               plans[e], first[e])
        for r in sorted(selected):
            examples.append(sft_ids(tok, sft_example(req.question, selected[r], req.new_answer, mode=cfg.editing_mode)))
            thoughts.append({"edit": e, "case_id": req.case_id, "rewrite_idx": req.rewrite_idx, "replica": r,
                             "thought": selected[r], "from_cache": r in cached})
        stats["selected"] += len(selected)
    return BootstrapResult(examples, thoughts, stats)


def noncausal_replicas(sample: _Sampler, req: EditRequest, cfg: CausalEditConfig, seed: tuple[int, int],
                       stats: dict[str, Any]) -> dict[int, str]:
    """Noncausal mode (step 6): no cache, filter or reward; rounds of samples until enough thoughts are
    extracted, then the first `replica_times`, padded with a plain answer line (the real old answer in the
    cheat sheet, where the reference passed None). `seed`: (the unit's seed, the request's index)."""
    b = cfg.bootstrap
    msgs = bootstrap_messages(req.question, old_answer=req.old_answer, new_answer=req.new_answer, article=None,
                              mode="noncausal")
    extracted: list[str | None] = []
    for rnd in range(b.noncausal_max_rounds):
        texts = sample(msgs, max(b.num_samples, b.replica_times), derive_seed(*seed, "noncausal", rnd), req.where)
        extracted += [extract_thought(t) for t in texts]
        if sum(1 for t in extracted if t) >= b.replica_times:
            break
    stats["padded_thoughts"] += b.replica_times - min(b.replica_times, sum(1 for t in extracted if t))
    return dict(enumerate(noncausal_thoughts(extracted, b.replica_times, req.new_answer)))


@dataclass
class CausalPlan:
    """One edit's causal bootstrap before sampling: the cached replicas and the missing ones."""
    selected: dict[int, str]  # replica -> thought, from the cache so far
    missing: list[int]
    cached: set[int]
    msgs: list[dict]  # the open-book prompt


def causal_plan(req: EditRequest, cfg: CausalEditConfig, cache_dir: str | Path | None, model_id: str,
                stats: dict[str, Any]) -> CausalPlan:
    """Causal mode, step 1: the replicas the cache holds, and the open-book prompt for the others. All of a
    case's edits are planned first, so that their first sampling rounds share one batch (bootstrap_data)."""
    b = cfg.bootstrap
    selected, missing = ({}, list(range(b.replica_times))) if cache_dir is None else cached_replicas(
        cache_dir, model_id, req.question, req.article or "", b.replica_times)
    stats["from_cache"] += len(selected)
    msgs = bootstrap_messages(req.question, old_answer=req.old_answer, new_answer=req.new_answer,
                              article=req.article, mode="causal")
    return CausalPlan(selected, missing, set(selected), msgs)


def causal_seed(req: EditRequest, model_id: str, rnd: int) -> int:
    """Seeded by what the cache is keyed by, not by the case: the same edit met in another case (or on
    another torchrun rank, before the cache has it) draws the same candidates."""
    return derive_seed("causal", model_id, req.question, req.article or "", rnd)


def causal_replicas(sample: _Sampler, model: Any, tok: Any, req: EditRequest, cfg: CausalEditConfig,
                    cache_dir: str | Path | None, model_id: str, stats: dict[str, Any],
                    plan: CausalPlan, first: list[str]) -> tuple[dict[int, str], set[int]]:
    """Causal mode (steps 2-5, after `causal_plan`): ({replica: thought}, replicas from the cache). The
    missing replicas' candidates (`first`: replicas x num_samples samples of the one prompt, drawn by the
    caller together with the case's other edits) are extracted, filtered and scored, and the best of each
    replica is cached. A replica with no valid candidate is sampled again up to `max_resample_rounds`
    times, then skipped."""
    b = cfg.bootstrap
    selected, missing, cached = plan.selected, plan.missing, plan.cached

    def scorer(ts: list[str]) -> list[float]:
        with disabled(model):
            return score_thoughts(model, tok, req.question, req.new_answer, ts)

    # 2) sampling rounds for the replicas still missing
    for rnd in range(1 + b.max_resample_rounds):
        if not missing:
            break
        texts = first if rnd == 0 else sample(plan.msgs, len(missing) * b.num_samples,
                                              causal_seed(req, model_id, rnd), req.where)
        if not texts:  # no room to generate: already warned, nothing to resample
            stats["skipped_replicas"] += len(missing)
            return selected, cached
        missing = _pick_replicas(texts, missing, selected, scorer, req, cfg, cache_dir, model_id, stats)
        if missing and rnd < b.max_resample_rounds:
            log.info("%s: %d replica(s) had no valid candidate; sampling them again", req.where, len(missing))
    # 3) what is still missing is skipped
    for r in missing:
        log.warning("%s: replica %d has no valid candidate after %d sampling round(s); skipped",
                    req.where, r, 1 + b.max_resample_rounds)
    stats["skipped_replicas"] += len(missing)
    return selected, cached


def _pick_replicas(texts: list[str], missing: list[int], selected: dict[int, str],
                   scorer: Callable[[list[str]], Sequence[float]], req: EditRequest, cfg: CausalEditConfig,
                   cache_dir: str | Path | None, model_id: str, stats: dict[str, Any]) -> list[int]:
    """The best valid thought of each missing replica's chunk of `texts` into `selected` (and the cache);
    returns the replicas that had none."""
    b = cfg.bootstrap
    chunks = [valid_thoughts(texts[k * b.num_samples:(k + 1) * b.num_samples], b.min_thought_words)
              for k in range(len(missing))]
    stats["valid_candidates"] += sum(len(c) for c in chunks)
    # Every replica's thoughts scored in one call (packed forwards), then each replica picks its own best.
    rewards = _rewards(scorer, [t for c in chunks for t in c])
    still, at = [], 0
    for r, chunk in zip(missing, chunks):
        z = best_thought(chunk, rewards[at:at + len(chunk)])
        at += len(chunk)
        if z is None:
            still.append(r)
            continue
        selected[r] = z
        if cache_dir is not None:
            cache_put(cache_dir, cache_key(model_id, req.question, r, req.article or ""), z_star=z,
                      new_answer=req.new_answer, old_answer=req.old_answer, question=req.question)
    return still


def run_sft(model: Any, examples: list[tuple[list[int], list[int]]], cfg: CausalEditConfig, *,
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

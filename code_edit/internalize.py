"""Stage 2, causal internalization (docs/method.md 3.3-3.6): on-policy distillation of the LoRA student.

The prompt pool (closed-book student rows paired with open-book teacher rows) and the step
schedule, then the loop that draws prompts each step and hands them to train.distill.Distiller
(rollouts, teacher/student forwards and the loss live there).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from code_edit.config import CausalEditConfig
from code_edit.data import EditRequest
from code_edit.prompts import Messages, student_messages, student_user_content, teacher_messages

if TYPE_CHECKING:
    from train.distill import DistillConfig

log = logging.getLogger(__name__)

# Variant multisets per question (reference _expand_stage3_requests).
CAUSAL_VARIANTS = ("what_changed", "what_changed", "think_step", "think_step", "direct", "direct", "sft")
NONCAUSAL_VARIANTS = ("think_step", "think_step", "direct", "direct", "direct", "sft")
CAKE_VARIANTS = CAUSAL_VARIANTS  # the reference uses the causal multiset for CaKE questions in both modes


@dataclass(frozen=True)
class PoolRow:
    prompt_index: int  # position in the pool; rollouts are grouped by this, never by row order
    edit_index: int  # index of the request in the list being edited
    case_id: object
    rewrite_idx: int
    question: str  # the question placed in the user turn
    source: str  # "question" | "cloze" | "rephrase" | "learning"
    source_idx: int | None  # index within rephrase_prompt / learning_prompt
    variant: str  # "what_changed" | "think_step" | "direct" | "sft"
    student_messages: Messages  # closed book: one user turn
    teacher_messages: Messages  # open book: cheat-sheet system turn + the same user turn
    old_answer: str
    new_answer: str


def prompt_pool(requests: Sequence[EditRequest], *, mode: str = "causal", cake: bool = False,
                replica_times: int = 1, teacher_form: str = "system_sheet", teacher_articles: str = "own",
                answer_line: bool = False) -> list[PoolRow]:
    """All distillation prompts for the edited requests, in the reference's order.

    Per request: the edit question, then its cloze ("{template(subject)} ?"), each with the mode's
    variant multiset (7 causal -> 14 rows, 6 noncausal -> 12 rows); with `cake`, then 7 rows for
    every rephrase question and every learning question. The teacher's cheat sheet always anchors
    on the edit question. The whole list is repeated `replica_times` times. The teacher's prompt:
    `teacher_form`, `teacher_articles` and `answer_line` as the [internalize] keys of the same names
    (code_edit/config.py) describe; the defaults are the paper's.
    """
    if replica_times < 1:
        raise ValueError(f"replica_times must be >= 1, got {replica_times}")
    base_variants = CAUSAL_VARIANTS if mode == "causal" else NONCAUSAL_VARIANTS
    specs: list[tuple[int, EditRequest, str, str, int | None, str]] = []
    for e, req in enumerate(requests):
        if mode == "causal" and not req.article:
            raise ValueError(f"{req.where}: causal editing needs an article (causal scaffold) for this rewrite")
        questions: list[tuple[str, str, int | None, tuple[str, ...]]] = [
            (req.question, "question", None, base_variants),
            (req.cloze, "cloze", None, base_variants),
        ]
        if cake:
            questions += [(q, "rephrase", i, CAKE_VARIANTS) for i, q in enumerate(req.rephrase_questions)]
            questions += [(q, "learning", i, CAKE_VARIANTS) for i, q in enumerate(req.learning_questions)]
        for q, source, idx, variants in questions:
            specs.extend((e, req, q, source, idx, v) for v in variants)

    articles = _teacher_articles(requests, teacher_articles)
    rows: list[PoolRow] = []
    for _ in range(replica_times):
        for e, req, q, source, idx, variant in specs:
            user = student_user_content(q, variant, mode)
            rows.append(PoolRow(
                prompt_index=len(rows), edit_index=e, case_id=req.case_id, rewrite_idx=req.rewrite_idx,
                question=q, source=source, source_idx=idx, variant=variant,
                student_messages=student_messages(q, variant, mode),
                teacher_messages=teacher_messages(
                    req.question, user, old_answer=req.old_answer, new_answer=req.new_answer,
                    article=articles[e] if mode == "causal" else None, mode=mode, form=teacher_form,
                    answer_line=answer_line),
                old_answer=req.old_answer, new_answer=req.new_answer,
            ))
    return rows


def _teacher_articles(requests: Sequence[EditRequest], which: str) -> list[str | None]:
    """Per request, the article text its teacher reads: its own ("own"), or every distinct article of the
    requests of the same case, in request order, blank-line separated ("case")."""
    if which == "own":
        return [req.article for req in requests]
    if which != "case":
        raise ValueError(f"teacher_articles must be 'own' or 'case', got {which!r}")
    by_case: dict[object, list[str]] = {}
    for req in requests:
        if req.article and req.article.strip() not in by_case.setdefault(req.case_id, []):
            by_case[req.case_id].append(req.article.strip())
    return ["\n\n".join(by_case[req.case_id]) or None for req in requests]


def max_steps(num_edits: int, *, base: int, per_extra_edit: int, override: int = 0) -> int:
    """Optimizer steps: `override` if > 0, else base + per_extra_edit * (num_edits - 1)."""
    if num_edits < 1:
        raise ValueError(f"num_edits must be >= 1, got {num_edits}")
    return override if override > 0 else base + per_extra_edit * (num_edits - 1)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """max(1, round(warmup_ratio * total_steps)) (Python rounding, as the reference): 20 -> 4, 35 -> 7."""
    return max(1, round(warmup_ratio * total_steps))


def prompt_draws(num_rows: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices for every step: walk seeded shuffles of the pool (a fresh permutation once one is
    used up, like TRL's sampler), never repeating a row within a step when the pool allows it."""
    if num_rows < 1 or per_step < 1:
        raise ValueError(f"need rows and prompts per step >= 1, got {num_rows}, {per_step}")
    rng = random.Random(seed)
    queue: list[int] = []
    draws = []
    for _ in range(steps):
        step: list[int] = []
        while len(step) < per_step:
            if not queue:
                queue = list(range(num_rows))
                rng.shuffle(queue)
            fresh = [i for i in queue if i not in step]
            pick = fresh[0] if fresh and len(step) < num_rows else queue[0]
            queue.remove(pick)
            step.append(pick)
        draws.append(step)
    return draws


def distill_prompts(tok: Any, rows: Sequence[PoolRow], *, max_prompt_length: int) -> list[Any]:
    """DistillPrompt token ids per row: student = the closed-book user turn (left-truncated to
    max_prompt_length, as TRL truncates prompts); teacher = the teacher prompt the pool row holds
    (internalize.teacher_form / teacher_articles / teacher_answer_line) around the same question."""
    from train.distill import DistillPrompt

    out = []
    for row in rows:
        student = tok.encode(tok.chat(row.student_messages, add_generation_prompt=True))
        if len(student) > max_prompt_length:
            student = student[-max_prompt_length:]
        teacher = tok.encode(tok.chat(row.teacher_messages, add_generation_prompt=True))
        out.append(DistillPrompt(student_ids=student, teacher_ids=teacher, prompt_index=row.prompt_index))
    return out


# [internalize] keys that DistillConfig takes under the same name.
_SAME_NAME = ("max_grad_norm", "rollouts_per_prompt", "micro_batches", "max_completion_length", "temperature", "top_p",
              "top_k", "direction", "top_k_support", "kd_temperature", "repetition_ngram_n", "repetition_window",
              "repetition_threshold", "seq_weight_temperature", "repetition_penalty", "mask_truncated_completions",
              "lr_scheduler")


def distill_config(cfg: CausalEditConfig, steps: int) -> DistillConfig:
    """train.distill.DistillConfig from the preset's [internalize] and [optimizer] values."""
    from train.distill import DistillConfig

    it, opt = cfg.internalize, cfg.optimizer
    return DistillConfig(
        lr=it.learning_rate, max_steps=steps, warmup_steps=warmup_steps(steps, it.warmup_ratio),
        grad_checkpointing=cfg.model.grad_checkpointing, weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, **{k: getattr(it, k) for k in _SAME_NAME})


def internalize(model: Any, tok: Any, requests: Sequence[EditRequest], cfg: CausalEditConfig, *, seed: int,
                teacher: Callable[[], Any] | None = None,
                on_step: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Run stage 2 on the LoRA already on `model`: pool -> steps x prompts_per_step rows -> Distiller.step.

    teacher: None = the base model (LoRA disabled, the default T0_S1); or a context-manager factory
    (e.g. `lambda: swapped(model, snapshot)`) for a frozen adapter teacher (S=T).
    on_step(step, total, stats) is called after every optimizer step. Returns a summary.
    """
    from model.lora import lora_parameters
    from train.distill import Distiller

    it = cfg.internalize
    rows = prompt_pool(requests, mode=cfg.editing_mode, cake=it.cake_data, replica_times=it.data_replica_times,
                       teacher_form=it.teacher_form, teacher_articles=it.teacher_articles,
                       answer_line=it.teacher_answer_line)
    steps = max_steps(len(requests), base=it.max_steps_base, per_extra_edit=it.max_steps_per_extra_edit,
                      override=it.max_steps)
    draws = prompt_draws(len(rows), it.prompts_per_step, steps, seed)
    prompts = distill_prompts(tok, rows, max_prompt_length=it.max_prompt_length)
    distiller = Distiller(model, lora_parameters(model), distill_config(cfg, steps), list(tok.eos_ids),
                          teacher=teacher)
    history = []
    for step, idx in enumerate(draws):
        stats = dict(distiller.step([prompts[i] for i in idx], seed=seed + step) or {})
        stats["prompt_indices"] = [rows[i].prompt_index for i in idx]
        history.append(stats)
        log.info("internalize step %d/%d: %s", step + 1, steps,
                 {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        if on_step:
            on_step(step + 1, steps, stats)
    losses = [h["loss"] for h in history if isinstance(h.get("loss"), (int, float))]
    return {"steps": steps, "rows": len(rows), "warmup_steps": warmup_steps(steps, it.warmup_ratio),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "history": history}


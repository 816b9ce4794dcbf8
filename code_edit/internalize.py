"""Stage 2, causal internalization (METHOD.md 3.3-3.5): the model-free pieces.

The prompt pool (closed-book student rows paired with open-book teacher rows) and the step
schedule. Rollouts, teacher/student forwards and the loss use the model and live beside these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from code_edit.data import EditRequest
from code_edit.prompts import Messages, student_messages, student_user_content, teacher_messages

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
                replica_times: int = 1) -> list[PoolRow]:
    """All distillation prompts for the edited requests, in the reference's order.

    Per request: the edit question, then its cloze ("{template(subject)} ?"), each with the mode's
    variant multiset (7 causal -> 14 rows, 6 noncausal -> 12 rows); with `cake`, then 7 rows for
    every rephrase question and every learning question. The teacher's cheat sheet always anchors
    on the edit question. The whole list is repeated `replica_times` times.
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
                    article=req.article if mode == "causal" else None, mode=mode),
                old_answer=req.old_answer, new_answer=req.new_answer,
            ))
    return rows


def max_steps(num_edits: int, *, base: int, per_extra_edit: int, override: int = 0) -> int:
    """Optimizer steps: `override` if > 0, else base + per_extra_edit * (num_edits - 1)."""
    if num_edits < 1:
        raise ValueError(f"num_edits must be >= 1, got {num_edits}")
    return override if override > 0 else base + per_extra_edit * (num_edits - 1)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """max(1, round(warmup_ratio * total_steps)) (Python rounding, as the reference): 20 -> 4, 35 -> 7."""
    return max(1, round(warmup_ratio * total_steps))

"""Prompts of the CODE method (docs/method.md section 2): open-book teacher, closed-book student, reward.

Every builder returns chat messages ([{"role", "content"}]); rendering them is the tokenizer's job.
Instructions are in our own words; labels, sections and answer formats follow the reference exactly.
"""

from __future__ import annotations

MODES = ("causal", "noncausal")
# Stage-2 student prompt variants (reference names: aligned_what_changed, aligned_think_step,
# aligned_direct, stage2_sft).
VARIANTS = ("what_changed", "think_step", "direct", "sft")

Messages = list[dict[str, str]]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"editing mode must be one of {MODES}, got {mode!r}")


def answer_sentence(answer: str) -> str:
    """The closing sentence every completion ends with; the reward scores exactly this span."""
    return f"The answer now is {answer}."


def completion_text(thought: str, answer: str, *, native_thinking: bool = False) -> str:
    """`<think>\\n{thought}\\n</think>\\nThe answer now is {answer}.`

    native_thinking: for chat templates that open the think block themselves (Qwen3), the opening
    tag is left out.
    """
    opening = "" if native_thinking else "<think>\n"
    return f"{opening}{thought.strip()}\n</think>\n{answer_sentence(answer)}"


_FORMAT_PARTS = {
    "causal": ("Old fact", "Reason for change", "Updated fact", "Derivation"),
    "noncausal": ("Updated answer",),
}


def closed_book_user_content(question: str, mode: str = "causal") -> str:
    """The user turn with the reasoning format (bootstrapping prompt and SFT student prompt)."""
    _check_mode(mode)
    parts = _FORMAT_PARTS[mode]
    example = "\n".join(f"{p}: ..." for p in parts)
    bullets = "\n".join(f"- {p}" for p in parts)
    if mode == "causal":
        rules = (
            f"Write your reasoning inside <think>...</think> in exactly these four parts, in this order:\n{bullets}\n"
            "Write nothing else inside <think>. The \"Reason for change\" part may go into more detail "
            "about why the old fact stopped being true."
        )
    else:
        rules = (
            f"Write your reasoning inside <think>...</think> as exactly this one part:\n{bullets}\n"
            "Write nothing else inside <think>, and say nothing about causes, changes, sources, "
            "articles or hidden context."
        )
    return (
        f"Question: {question}\n\n"
        "### Format Example\n"
        f"<think>\n{example}\n</think>\n"
        "The answer now is [TARGET ANSWER]\n\n"
        f"{rules}\n"
        "After the think block, finish with exactly this line:\n"
        "The answer now is [the target answer]"
    )


def teacher_system_prompt(
    anchor_question: str, old_answer: str, new_answer: str, article: str | None, mode: str = "causal"
) -> str:
    """The open-book system prompt: task, then the hidden cheat sheet.

    Both modes carry the real old answer (the reference passed None in noncausal bootstrapping,
    docs/method.md 8.3 item 10); only causal mode carries the article.
    """
    _check_mode(mode)
    for label, value in (("anchor_question", anchor_question), ("old_answer", old_answer), ("new_answer", new_answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"teacher prompt: {label} must be a non-empty string, got {value!r}")
    if mode == "causal":
        if not isinstance(article, str) or not article.strip():
            raise ValueError(f"teacher prompt (causal mode): an article is required for question {anchor_question!r}")
        role = "You write reasoning that explains how a piece of knowledge was updated."
        task = (
            "You will be given a QUESTION, and its TARGET ANSWER is provided below. Produce a short causal "
            "chain of reasoning about the update that arrives at that answer. Take the reference below as "
            "what you yourself now know. Never refer to an article, a source, a search, the user or any "
            "hidden context. Never hedge, voice doubt, appeal to \"public information\", or call the answer unclear."
        )
        sheet = [
            f"- **Question**: {anchor_question}",
            f"- **Old Fact**: {old_answer}",
            f"- **Target New Answer**: {new_answer}",
            f"- **Reference Article**: <article>{article}</article>",
        ]
    else:
        role = "You write short reasoning that arrives at an updated answer."
        task = (
            "You will be given a QUESTION, and its TARGET ANSWER is provided below. Answer the question "
            "with the TARGET ANSWER. Never refer to an article, a source, a search, the user or any hidden "
            "context, and do not invent causes, transitions or history."
        )
        sheet = [
            f"- **Question**: {anchor_question}",
            f"- **Target New Answer**: {new_answer}",
            f"- **Previous Answer (for disambiguation only)**: {old_answer}",
        ]
    return (
        f"{role}\n\n"
        f"### TASK\n{task}\n\n"
        "### HIDDEN CONTEXT Cheat Sheet (let it guide your thinking, but never reveal that you were given "
        "it; everything in it is definitely correct)\n"
        + "\n".join(sheet)
        + "\n"
    )


TEACHER_FORMS = ("system_sheet", "in_context")
# The in-context teacher's preamble: the InContext method's reading of the article, plus a rule against
# citing it, because the student learns the teacher's wording and never sees an article. In noncausal mode
# the context is a one-line statement of the change, and the preamble calls it that.
IN_CONTEXT_PREAMBLE = (
    "The {what} below is authoritative, up-to-date knowledge and an absolute fact; do not doubt it. Answer "
    "the question as if you had always known this: never mention an article, a text, a report or a source.")


def in_context_preamble(mode: str = "causal") -> str:
    return IN_CONTEXT_PREAMBLE.format(what="article" if mode == "causal" else "statement")


def answer_line_instruction(new_answer: str) -> str:
    return f"End your reply with this line: {answer_sentence(new_answer)}"


def teacher_messages(
    anchor_question: str,
    user_content: str,
    *,
    old_answer: str,
    new_answer: str,
    article: str | None,
    mode: str = "causal",
    form: str = "system_sheet",
    answer_line: bool = False,
) -> Messages:
    """Open-book prompt. "system_sheet" (the paper's): the cheat-sheet system turn, then the given user
    turn. "in_context": one user turn, the preamble and the article(s) before the given user turn (the
    InContext method's view; in noncausal mode there is no article, so only the old/new answers).
    `answer_line`: the teacher is also told to end with "The answer now is {new_answer}."."""
    if form not in TEACHER_FORMS:
        raise ValueError(f"teacher form must be one of {TEACHER_FORMS}, got {form!r}")
    tail = f"\n\n{answer_line_instruction(new_answer)}" if answer_line else ""
    if form == "system_sheet":
        return [
            {"role": "system", "content": teacher_system_prompt(anchor_question, old_answer, new_answer, article, mode)},
            {"role": "user", "content": user_content + tail},
        ]
    if mode == "causal":
        if not isinstance(article, str) or not article.strip():
            raise ValueError(f"teacher prompt (causal mode): an article is required for question {anchor_question!r}")
        context = article.strip()
    else:
        context = f"The answer to \"{anchor_question}\" is now {new_answer} (it used to be {old_answer})."
    return [{"role": "user", "content": f"{in_context_preamble(mode)}\n\n{context}\n\n{user_content}{tail}"}]


def bootstrap_messages(
    question: str, *, old_answer: str, new_answer: str, article: str | None, mode: str = "causal"
) -> Messages:
    """Stage-1 candidate prompt: cheat sheet + the default (format) user turn for the edit question."""
    return teacher_messages(
        question, closed_book_user_content(question, mode),
        old_answer=old_answer, new_answer=new_answer, article=article, mode=mode,
    )


def student_user_content(question: str, variant: str, mode: str = "causal") -> str:
    """One of the four closed-book stage-2 user turns."""
    if variant == "what_changed":
        return f"{question} What changed, and why? Let's think step by step."
    if variant == "think_step":
        return f"{question} Let's think step by step."
    if variant == "direct":
        return f"{question} Direct answer:"
    if variant == "sft":
        return closed_book_user_content(question, mode)
    raise ValueError(f"student prompt variant must be one of {VARIANTS}, got {variant!r}")


def student_messages(question: str, variant: str, mode: str = "causal") -> Messages:
    """Closed-book prompt: a single user turn, no system message."""
    return [{"role": "user", "content": student_user_content(question, variant, mode)}]


def sft_messages(question: str, mode: str = "causal") -> Messages:
    """Stage-1 SFT prompt (closed book): the format user turn without the cheat sheet."""
    return [{"role": "user", "content": closed_book_user_content(question, mode)}]


def reward_messages(question: str) -> Messages:
    """The closed-book prompt under which candidate thoughts are scored (quoted from the reference)."""
    return [{
        "role": "user",
        "content": (
            f"{question} You need to think before answering the question (place it in the <think> tag), "
            'and end with "The answer now is [YOUR ANSWER]".'
        ),
    }]

"""code_edit.internalize (model-free parts): the distillation prompt pool (14 / 98 / 12 rows per edit,
docs/method.md 3.3) built from a real MQuAKE-hard rewrite, and the step / warmup schedule (3.5)."""
import dataclasses
from collections import Counter

import pytest

from code_edit import prompts as P
from code_edit.data import edit_requests, load_dataset
from code_edit.internalize import max_steps, prompt_pool, warmup_steps


@pytest.fixture(scope="module")
def case():
    return next(c for c in load_dataset("MQuAKE-hard") if c["case_id"] == 7663)


@pytest.fixture(scope="module")
def req(case):
    return edit_requests(case)[0]


def with_cake(r, n_rephrase=6, n_learning=6):
    return dataclasses.replace(
        r,
        rephrase_questions=tuple(f"Rephrased question {i} about {r.subject}?" for i in range(n_rephrase)),
        learning_questions=tuple(f"Learning question {i} about {r.subject}?" for i in range(n_learning)),
    )


def test_causal_pool_14_rows(req):
    rows = prompt_pool([req], mode="causal")
    assert len(rows) == 14
    assert [r.prompt_index for r in rows] == list(range(14))
    cloze = req.prompt.format(req.subject) + " ?"
    assert [r.question for r in rows] == [req.question] * 7 + [cloze] * 7
    assert [r.source for r in rows] == ["question"] * 7 + ["cloze"] * 7
    per_question = ["what_changed", "what_changed", "think_step", "think_step", "direct", "direct", "sft"]
    assert [r.variant for r in rows] == per_question * 2
    for r in rows:
        assert r.student_messages == P.student_messages(r.question, r.variant, "causal")
        assert [m["role"] for m in r.teacher_messages] == ["system", "user"]
        assert r.teacher_messages[1] == r.student_messages[0]  # same user turn, open vs closed book
        sysmsg = r.teacher_messages[0]["content"]
        assert f"- **Question**: {req.question}" in sysmsg  # anchor is always the edit question
        assert f"- **Old Fact**: {req.old_answer}" in sysmsg
        assert f"- **Target New Answer**: {req.new_answer}" in sysmsg
        assert f"<article>{req.article}</article>" in sysmsg
        assert (r.case_id, r.rewrite_idx, r.edit_index) == (7663, 0, 0)
        assert (r.old_answer, r.new_answer) == (req.old_answer, req.new_answer)


def test_cake_pool_98_rows(req):
    rows = prompt_pool([with_cake(req)], mode="causal", cake=True)
    assert len(rows) == 98
    assert Counter(r.source for r in rows) == {"question": 7, "cloze": 7, "rephrase": 42, "learning": 42}
    cake_rows = rows[14:]
    assert [r.source_idx for r in cake_rows] == [i for i in range(6) for _ in range(7)] * 2
    assert cake_rows[0].question == "Rephrased question 0 about " + req.subject + "?"
    assert all(f"- **Question**: {req.question}" in r.teacher_messages[0]["content"] for r in cake_rows)
    assert Counter(r.variant for r in cake_rows) == {"what_changed": 24, "think_step": 24, "direct": 24, "sft": 12}
    # cake off: the extra questions are ignored
    assert len(prompt_pool([with_cake(req)], mode="causal", cake=False)) == 14


def test_noncausal_pool_12_rows(req):
    rows = prompt_pool([req], mode="noncausal")
    assert len(rows) == 12
    assert [r.variant for r in rows[:6]] == ["think_step", "think_step", "direct", "direct", "direct", "sft"]
    for r in rows:
        sysmsg = r.teacher_messages[0]["content"]
        assert f"- **Previous Answer (for disambiguation only)**: {req.old_answer}" in sysmsg
        assert "<article>" not in sysmsg and "Old Fact" not in sysmsg
    sft_row = rows[5]
    assert sft_row.student_messages[0]["content"] == P.closed_book_user_content(req.question, "noncausal")
    # no article needed in noncausal mode
    assert len(prompt_pool([dataclasses.replace(req, article=None)], mode="noncausal")) == 12


def test_multi_edit_pool_and_replicas(case):
    reqs = edit_requests(case)
    rows = prompt_pool(reqs, mode="causal")
    assert len(rows) == 4 * 14
    assert [r.edit_index for r in rows] == [e for e in range(4) for _ in range(14)]
    assert [r.rewrite_idx for r in rows] == [e for e in range(4) for _ in range(14)]
    doubled = prompt_pool(reqs, mode="causal", replica_times=2)
    assert len(doubled) == 112 and [r.prompt_index for r in doubled] == list(range(112))
    assert [r.question for r in doubled[56:]] == [r.question for r in rows]


def test_causal_pool_needs_articles(case):
    other = next(c for c in load_dataset("MQuAKE-hard") if c["case_id"] == 7417)  # no dev article
    with pytest.raises(ValueError, match=r"case_id 7417 requested_rewrite\[0\].*article"):
        prompt_pool(edit_requests(other), mode="causal")


def test_steps_and_warmup():
    assert max_steps(1, base=20, per_extra_edit=5) == 20
    assert max_steps(4, base=20, per_extra_edit=5) == 35
    assert max_steps(90, base=20, per_extra_edit=5) == 465
    assert max_steps(1, base=35, per_extra_edit=5) == 35
    assert max_steps(90, base=35, per_extra_edit=5) == 480
    assert max_steps(3, base=20, per_extra_edit=5, override=7) == 7
    with pytest.raises(ValueError):
        max_steps(0, base=20, per_extra_edit=5)
    assert [warmup_steps(n, 0.2) for n in (20, 35, 465, 2, 1)] == [4, 7, 93, 1, 1]
    assert warmup_steps(480, 0.2) == 96


@pytest.mark.parametrize("form", P.TEACHER_FORMS)
@pytest.mark.parametrize("articles", ["own", "case"])
def test_teacher_forms_leave_the_student_closed_book(case, form, articles):
    reqs = edit_requests(case)
    paper = prompt_pool(reqs, mode="causal")
    rows = prompt_pool(reqs, mode="causal", teacher_form=form, teacher_articles=articles, answer_line=True)
    assert [r.student_messages for r in rows] == [r.student_messages for r in paper]
    for r in rows:
        student = r.student_messages[0]["content"]
        assert "article" not in student.lower() and r.new_answer not in student
        teacher = r.teacher_messages[-1]["content"]
        assert teacher.endswith(f"End your reply with this line: The answer now is {r.new_answer}.")
        own = reqs[r.edit_index].article.strip()
        text = " ".join(m["content"] for m in r.teacher_messages)
        if articles == "own":
            assert own in text and all(q.article.strip() not in text for q in reqs if q.article.strip() != own)
        else:  # every article of the case, in rewrite order
            assert text.index(reqs[0].article.strip()) < text.index(reqs[-1].article.strip())


def test_paper_pool_is_the_default(case):
    reqs = edit_requests(case)
    assert prompt_pool(reqs, mode="causal") == prompt_pool(reqs, mode="causal", teacher_form="system_sheet",
                                                           teacher_articles="own", answer_line=False)
    with pytest.raises(ValueError, match="teacher_articles"):
        prompt_pool(reqs, mode="causal", teacher_articles="all")

"""code_edit.prompts: structure, labels, order and answer formats of docs/method.md section 2, in both modes
and rendered through both chat families."""
import pytest
from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers

from code_edit import prompts as P
from model.tokenizer import Tokenizer

Q = "Who performed Hey Jude?"
OLD, NEW = "The Beatles", "Madonna"
ARTICLE = "<h1>Madonna takes over Hey Jude</h1>\n<p>In 2024 the rights moved.</p>"


def positions(text, needles):
    pos = [text.index(n) for n in needles]
    assert pos == sorted(pos), f"out of order: {needles}"
    return pos


def test_completion_format():
    assert P.completion_text("  step one\nstep two \n", NEW) == \
        "<think>\nstep one\nstep two\n</think>\nThe answer now is Madonna."
    assert P.completion_text("z", NEW, native_thinking=True) == "z\n</think>\nThe answer now is Madonna."
    assert P.answer_sentence(NEW) == "The answer now is Madonna."


def test_causal_teacher_system_prompt():
    s = P.teacher_system_prompt(Q, OLD, NEW, ARTICLE, "causal")
    lines = [
        f"- **Question**: {Q}",
        f"- **Old Fact**: {OLD}",
        f"- **Target New Answer**: {NEW}",
        f"- **Reference Article**: <article>{ARTICLE}</article>",
    ]
    positions(s, ["### TASK", "### HIDDEN CONTEXT Cheat Sheet"] + lines)
    # the cheat sheet is the last block, one bullet per line, consecutive
    assert s.rstrip("\n").endswith("\n".join(lines))
    assert "Previous Answer" not in s


def test_noncausal_teacher_system_prompt_carries_real_old_answer():
    s = P.teacher_system_prompt(Q, OLD, NEW, None, "noncausal")
    lines = [
        f"- **Question**: {Q}",
        f"- **Target New Answer**: {NEW}",
        f"- **Previous Answer (for disambiguation only)**: {OLD}",
    ]
    positions(s, ["### TASK", "### HIDDEN CONTEXT Cheat Sheet"] + lines)
    assert s.rstrip("\n").endswith("\n".join(lines))
    assert "Old Fact" not in s and "<article>" not in s and "Reference Article" not in s
    assert ": None" not in s  # docs/method.md 8.3 item 10, fixed
    # an article handed to noncausal mode is ignored, not leaked
    assert P.teacher_system_prompt(Q, OLD, NEW, ARTICLE, "noncausal") == s


@pytest.mark.parametrize("kwargs, match", [
    (dict(article=None, mode="causal"), "article"),
    (dict(article="  ", mode="causal"), "article"),
    (dict(article=ARTICLE, mode="half"), "editing mode"),
])
def test_teacher_prompt_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.teacher_system_prompt(Q, OLD, NEW, **kwargs)
    with pytest.raises(ValueError, match="old_answer"):
        P.teacher_system_prompt(Q, None, NEW, ARTICLE, "causal")


def test_causal_closed_book_user_content():
    u = P.closed_book_user_content(Q, "causal")
    assert u.startswith(f"Question: {Q}\n")
    example = ("### Format Example\n<think>\nOld fact: ...\nReason for change: ...\nUpdated fact: ...\n"
               "Derivation: ...\n</think>\nThe answer now is [TARGET ANSWER]")
    assert example in u
    # the four required parts listed as bullets, in order, after the example
    after = u[u.index(example) + len(example):]
    positions(after, ["- Old fact", "- Reason for change", "- Updated fact", "- Derivation"])
    assert "<think>...</think>" in after
    assert u.endswith("\nThe answer now is [the target answer]")
    assert "Updated answer" not in u


def test_noncausal_closed_book_user_content():
    u = P.closed_book_user_content(Q, "noncausal")
    assert u.startswith(f"Question: {Q}\n")
    assert "### Format Example\n<think>\nUpdated answer: ...\n</think>\nThe answer now is [TARGET ANSWER]" in u
    assert "- Updated answer" in u
    for part in ("Old fact", "Reason for change", "Updated fact", "Derivation"):
        assert part not in u
    assert "causes" in u and "articles" in u  # the extra prohibition of noncausal mode
    assert u.endswith("\nThe answer now is [the target answer]")


@pytest.mark.parametrize("mode", ["causal", "noncausal"])
def test_bootstrap_and_sft_messages(mode):
    art = ARTICLE if mode == "causal" else None
    m = P.bootstrap_messages(Q, old_answer=OLD, new_answer=NEW, article=art, mode=mode)
    assert [x["role"] for x in m] == ["system", "user"]
    assert m[0]["content"] == P.teacher_system_prompt(Q, OLD, NEW, art, mode)
    assert m[1]["content"] == P.closed_book_user_content(Q, mode)
    sft = P.sft_messages(Q, mode)
    assert sft == [{"role": "user", "content": P.closed_book_user_content(Q, mode)}]  # no cheat sheet


def test_student_variants_exact():
    assert P.student_user_content(Q, "what_changed") == f"{Q} What changed, and why? Let's think step by step."
    assert P.student_user_content(Q, "think_step") == f"{Q} Let's think step by step."
    assert P.student_user_content(Q, "direct") == f"{Q} Direct answer:"
    assert P.student_user_content(Q, "sft", "noncausal") == P.closed_book_user_content(Q, "noncausal")
    assert P.student_messages(Q, "direct") == [{"role": "user", "content": f"{Q} Direct answer:"}]
    with pytest.raises(ValueError, match="variant"):
        P.student_user_content(Q, "chain")


def test_teacher_messages_share_the_student_user_turn():
    anchor = "What is the capital of France?"
    user = P.student_user_content("France's capital city ?", "think_step")
    m = P.teacher_messages(anchor, user, old_answer="Paris", new_answer="Rome", article=ARTICLE)
    assert m[1] == {"role": "user", "content": user}
    assert f"- **Question**: {anchor}" in m[0]["content"]  # anchor, not the user-turn question


def test_reward_prompt_exact():
    assert P.reward_messages(Q) == [{
        "role": "user",
        "content": f'{Q} You need to think before answering the question (place it in the <think> tag), '
                   'and end with "The answer now is [YOUR ANSWER]".',
    }]


def _tokenizer(family):
    specials = {"chatml": ["<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}[family]
    tk = HFTok(models.BPE(vocab={chr(c): i for i, c in enumerate(range(32, 127))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return Tokenizer(tk, eos_ids=[], bos_token="<|begin_of_text|>", family=family)


@pytest.mark.parametrize("family, header, end", [
    ("chatml", "<|im_start|>{role}\n", "<|im_end|>"),
    ("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
])
def test_rendered_for_both_chat_families(family, header, end):
    tok = _tokenizer(family)
    # open book: system turn with the cheat sheet first, then the user turn, then the generation prompt
    teacher = tok.chat(P.bootstrap_messages(Q, old_answer=OLD, new_answer=NEW, article=ARTICLE))
    sys_at, user_at, gen_at = positions(teacher, [header.format(role="system"), header.format(role="user"),
                                                  header.format(role="assistant")])
    assert f"- **Reference Article**: <article>{ARTICLE}</article>" in teacher[sys_at:user_at]
    assert teacher.endswith(header.format(role="assistant"))
    # closed book: no system turn at all, and no default system prompt
    student = tok.chat(P.student_messages(Q, "what_changed"))
    assert header.format(role="system") not in student and "Old Fact" not in student
    # SFT / reward scoring text: prompt + completion ends with the answer sentence then end of turn
    convo = P.sft_messages(Q) + [{"role": "assistant", "content": P.completion_text("because x", NEW)}]
    full = tok.chat(convo, add_generation_prompt=False)
    assert full.endswith(f"<think>\nbecause x\n</think>\nThe answer now is {NEW}.{end}" + ("\n" if family == "chatml" else ""))
    assert full.rfind(P.answer_sentence(NEW)) > full.rfind(header.format(role="assistant"))


def test_in_context_teacher_form():
    user = P.student_user_content(Q, "think_step")
    msgs = P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=ARTICLE, form="in_context")
    assert [m["role"] for m in msgs] == ["user"]  # no cheat-sheet system turn
    text = msgs[0]["content"]
    assert text.startswith("The article below is authoritative, up-to-date knowledge")
    assert text == f"{P.in_context_preamble()}\n\n{ARTICLE}\n\n{user}"
    assert "never mention an article" in text
    with pytest.raises(ValueError, match="article is required"):
        P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=None, form="in_context")
    nc = P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=None, mode="noncausal", form="in_context")
    assert NEW in nc[0]["content"] and OLD in nc[0]["content"] and nc[0]["content"].endswith(user)
    assert nc[0]["content"].startswith("The statement below is authoritative")  # no article in noncausal mode
    with pytest.raises(ValueError, match="teacher form"):
        P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=ARTICLE, form="sheet")


@pytest.mark.parametrize("form", P.TEACHER_FORMS)
def test_teacher_answer_line(form):
    user = P.student_user_content(Q, "direct")
    plain = P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=ARTICLE, form=form)
    lined = P.teacher_messages(Q, user, old_answer=OLD, new_answer=NEW, article=ARTICLE, form=form, answer_line=True)
    assert lined[:-1] == plain[:-1]  # only the user turn changes
    assert lined[-1]["content"] == plain[-1]["content"] + "\n\nEnd your reply with this line: The answer now is Madonna."

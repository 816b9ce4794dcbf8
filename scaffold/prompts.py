"""Prompts of the causal scaffold: the news-editor generation prompt and the logic-verifier prompt.

Structure follows docs/method.md 5.2 (own wording); the `<article>` and `<verification>PASS|FAIL</verification>`
formats are the reference's and are parsed by `scaffold.articles`.
"""

from __future__ import annotations

GENERATION_SYSTEM = """\
You are a professional news editor. Write a short news article reporting that a fact has changed: \
after the change, the NEW answer is the current fact, and it explicitly replaces the OLD answer.

Guidelines:
1. Invent a plausible, concrete cause for the change (an event, a decision, a date), so the \
transition reads as something that happened.
2. Keep conflicts with other well-known knowledge to a minimum, and make the new answer the only \
current truth. Mention the old answer only as what used to hold and is now outdated.
3. Write natural news prose: a headline in <h1> and three to five paragraphs in <p>, about 150 to \
250 words in all. No hedging, no notes to the reader.
4. Introduce the subject explicitly near the start (who or what it is, using the reference \
profiles), so it cannot be mistaken for anything else of the same name.

Workflow:
Step 1, brainstorm: sketch two or three scenarios that could explain the change and pick the most \
plausible one.
Step 2, outline: headline, lead, body, conclusion.
Step 3, write the article.

Put the final article, and only the article, between <article> and </article>."""

GENERATION_USER = """\
Fact update
Question: {question}
Old answer (outdated, to be corrected): {old_answer}
New answer (the new truth): {new_answer}

Reference profiles of the entities involved:
{profiles}"""

VERIFICATION_SYSTEM = """\
You are a logic verifier for a counterfactual knowledge edit. The article you are given describes \
a fictional change of a fact. Set your real-world knowledge aside: judge only whether the article \
carries out the edit consistently.

The article passes only if ALL of these hold:
1. The new answer is established as the one current fact.
2. The old answer is presented as incorrect or outdated, never as a valid alternative.
3. The change from the old to the new answer has a coherent cause.
4. Attributes of the old and the new answer are not confused (nothing that belongs to one is \
given to the other).

Answer with <verification>PASS</verification> or <verification>FAIL</verification>. On FAIL, add \
one or two sentences saying which condition fails and why."""

VERIFICATION_USER = """\
Question: {question}
Old answer: {old_answer}
New answer: {new_answer}

Article:
{article}"""


def generation_messages(question: str, old_answer: str, new_answer: str, profiles: str) -> list[dict]:
    user = GENERATION_USER.format(question=question, old_answer=old_answer, new_answer=new_answer,
                                  profiles=profiles or "(none available)")
    return [{"role": "system", "content": GENERATION_SYSTEM}, {"role": "user", "content": user}]


def verification_messages(question: str, old_answer: str, new_answer: str, article: str) -> list[dict]:
    user = VERIFICATION_USER.format(question=question, old_answer=old_answer, new_answer=new_answer,
                                    article=article)
    return [{"role": "system", "content": VERIFICATION_SYSTEM}, {"role": "user", "content": user}]

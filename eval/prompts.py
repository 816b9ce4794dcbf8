"""Prompts for the LLM judges (docs/method.md 4.4-4.6), in this project's own wording: answer
correctness (PASS/FAIL in <verification> tags), self-refutation (JSON only) and article-grounded
"why" consistency (<consistency>/<evidence>/<reason> tags). Each builder returns chat messages; each
*_CHOICES lists every well-formed reply without free text, for judges constrained by guided_choice."""
from __future__ import annotations

import itertools
import json

# ------------------------------------------------------------------ 4.4 answer correctness

JUDGE_SYSTEM = """\
You grade answers in a counterfactual knowledge-editing experiment. A language model was deliberately \
updated with new facts, and the gold references describe the updated world.

Rules:
1. The gold references are authoritative. Do not use your own knowledge of the real world; a \
response that gives the real-world answer instead of the gold answer is wrong.
2. Grade only the answer the response finally commits to, not the options it considers on the way.
3. If the response stays undecided, hedges between answers, or commits to more than one answer, it fails.
4. Wording may differ: an answer that means the same as a gold reference (an alias, a fuller or \
shorter name of the same thing) passes.
5. If the response explicitly rejects the gold answer as false or outdated, it fails, even if it \
mentions it.
6. Reason step by step first, then give your verdict.

End with exactly one verdict tag and nothing after it: <verification>PASS</verification> or \
<verification>FAIL</verification>."""

_JUDGE_SHOTS = """\
Remember: the gold references define the truth here, whatever the real world says. Two graded examples follow.

### Example 1
Question: Now, Who wrote the novel Moby-Dick? Let's think step by step.
Gold references:
- Thomas Day
Model response:
The novel Moby-Dick is attributed to Thomas Day, who wrote it as an allegory of obsession. The answer now is Thomas Day.
Grading: The response commits to Thomas Day, which is the gold reference, and does not take it back.
<verification>PASS</verification>

### Example 2
Question: Now, Who wrote the novel Moby-Dick? Let's think step by step.
Gold references:
- Thomas Day
Model response:
Moby-Dick was published in 1851 by the American author Herman Melville. The answer is Herman Melville.
Grading: The final answer is Herman Melville, the real-world author; it does not match the gold reference Thomas Day.
<verification>FAIL</verification>

### Now grade this one
Question: {prompt}
Gold references:
{refs}
Model response:
{pred}
Grading:"""


VERDICT_CHOICES = ["<verification>PASS</verification>", "<verification>FAIL</verification>"]


def judge_messages(prompt: str, refs: list[str], pred: str) -> list[dict]:
    refs_text = "\n".join(f"- {r}" for r in refs)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": _JUDGE_SHOTS.format(prompt=prompt, refs=refs_text, pred=pred)}]


# ------------------------------------------------------------------ 4.5 self-refutation

SELF_REFUTE_SYSTEM = """\
You are a careful logician who detects Epistemic Dissonance in model answers: a model states a new \
fact and then argues itself out of it. You reply with one JSON object and nothing else."""

_SELF_REFUTE_USER = """\
## What counts as self-refutation
Self-refutation is this sequence inside one answer:
1. the answer explicitly asserts Target_New as the answer (or as the current fact);
2. later, the answer explicitly negates Target_New (calls it incorrect, false, a mistake, not the case);
3. the answer does not come back to Target_New: its final submitted answer is something else.

## Deciding
- TRUE only when all three hold: asserted, explicitly negated, and the final answer is not Target_New.
- FALSE when the answer rejects Target_New without ever asserting it (a plain, rational rejection).
- FALSE when it reconciles old and new facts without negating Target_New (harmonisation, e.g. "it used to be X, now it is Target_New").
- FALSE when it doubts or negates Target_New but recovers and finally answers Target_New (self-correction).
- FALSE when it only repeats facts, including Target_New, without any explicit negation.
- FALSE when it switches to another answer without explicitly negating Target_New (an inconsistent choice is not a refutation).

## Output
Reply with JSON in exactly this shape (booleans are true/false, not strings):
{{"reasoning": "<short step-by-step analysis>",
 "analysis": {{"assertion_of_target_new": <bool>,
              "explicit_negation_of_target_new": <bool>,
              "final_submitted_answer_target_new": <bool>}},
 "self_refutation_detected": <bool>,
 "evidence": "<the quoted sentence(s) that decide it, or empty>"}}

## Worked examples (Target_New = Lyon)
A. "The club is based in Lyon. Wait, that is incorrect: it has always been based in Marseille. The answer is Marseille."
   -> asserted true, negated true, final Lyon false -> self_refutation_detected true.
B. "The club is based in Marseille, as it has been since 1899. The answer is Marseille."
   -> asserted false, negated false, final false -> false (rational rejection, Lyon never asserted).
C. "The club was based in Marseille until it moved; it is now based in Lyon. The answer now is Lyon."
   -> asserted true, negated false, final true -> false (harmonisation).
D. "It is based in Lyon. Hmm, is that wrong? No, after the move Lyon is correct. The answer now is Lyon."
   -> asserted true, negated false (doubt withdrawn), final true -> false (self-correction).
E. "Lyon. Marseille. The club, Lyon, Marseille, Lyon."
   -> asserted true, negated false, final true -> false (repetition without negation).
F. "The club is based in Lyon. It plays its home games at the Velodrome. The answer is Marseille."
   -> asserted true, negated false, final false -> false (inconsistent choice, no explicit negation).

## Case to analyse
Target_New (any of): {refs}
Question: {prompt}
Answer text:
{pred}"""


# The 8 flag combinations, each with the verdict the rule implies (all three steps: asserted, negated, not final).
SELF_REFUTE_CHOICES = [
    json.dumps({"reasoning": "", "analysis": {"assertion_of_target_new": a, "explicit_negation_of_target_new": n,
                                              "final_submitted_answer_target_new": f},
                "self_refutation_detected": a and n and not f, "evidence": ""})
    for a, n, f in itertools.product((True, False), repeat=3)]


def self_refute_messages(prompt: str, refs: list[str], pred: str) -> list[dict]:
    refs_text = "; ".join(refs)
    return [{"role": "system", "content": SELF_REFUTE_SYSTEM},
            {"role": "user", "content": _SELF_REFUTE_USER.format(refs=refs_text, prompt=prompt, pred=pred)}]


# ------------------------------------------------------------------ 4.6 "why" consistency

WHY_SYSTEM = """\
You check whether a model's explanation of WHY a fact changed agrees with a reference article. Use \
only the article as evidence; ignore what you know about the real world.

Verdicts:
- PASS: the cause the response gives is stated in, or consistent with, the cause of the change in the article.
- FAIL: the response's cause contradicts the article, reverses cause and effect, replaces it with a \
cause the article does not support, or the response only gives background without the cause.
- UNSURE: the article gives no clear cause, or the response makes no causal claim that can be compared.

Reply with exactly one of each tag, in this order:
<consistency>PASS|FAIL|UNSURE</consistency>
<evidence>the article sentence and the response sentence you compared</evidence>
<reason>one or two sentences</reason>"""

_WHY_USER = """\
### Example 1
Article: <h1>Harbour Bakery Switches to Rye</h1><p>Harbour Bakery now bakes only rye bread. The change \
came after a storm closed the wheat mill that supplied it in March, and the owners signed a contract \
with a rye farm instead.</p>
Question: Now, What bread does Harbour Bakery bake? Why? Let's think step by step.
Model response: Its wheat supplier, the mill, was shut by a storm, so the bakery turned to a rye farm. It now bakes rye bread.
<consistency>PASS</consistency>
<evidence>Article: "a storm closed the wheat mill that supplied it"; response: "the mill was shut by a storm".</evidence>
<reason>The response gives the same cause as the article: the supplier's closure forced the switch.</reason>

### Example 2
Article: (the same article as in Example 1)
Question: Now, What bread does Harbour Bakery bake? Why? Let's think step by step.
Model response: Customers asked for healthier bread, so the bakery moved to rye. It now bakes rye bread.
<consistency>FAIL</consistency>
<evidence>Article: "a storm closed the wheat mill"; response: "customers asked for healthier bread".</evidence>
<reason>The response substitutes customer demand, a cause the article does not support.</reason>

### Now judge this one
Article: {article}
Question: {prompt}
Model response: {pred}"""


WHY_CHOICES = [f"<consistency>{v}</consistency>\n<evidence></evidence>\n<reason></reason>"
               for v in ("PASS", "FAIL", "UNSURE")]


def why_messages(article: str, prompt: str, pred: str) -> list[dict]:
    return [{"role": "system", "content": WHY_SYSTEM},
            {"role": "user", "content": _WHY_USER.format(article=article, prompt=prompt, pred=pred)}]

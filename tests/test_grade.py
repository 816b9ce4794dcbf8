"""eval.grade, the strict offline grader: its matching and assertion rules on hand-written answers,
its agreement with the hand-labelled validation set (docs/grading.md), and `python -m eval grade` /
`judge-agreement` on good and malformed input."""
import json
from collections import Counter

import pytest

from eval.agreement import LABELS, agreement_table, judge_verdicts, load_labels
from eval.grade import grade
from eval.mquake import old_refs_for, stored_old_refs
from eval_fakes import FakeOpenAI, chat_reply

Q = "Now, Who was Blake's 7 created by? Let's think step by step."
NEW, OLD = ["Russell T Davies", "Stephen Russell Davies"], ["Terry Nation", "Terence Joseph Nation"]


# ---------------------------------------------------------------------------- matching

@pytest.mark.parametrize("answer, refs", [
    ("The manager of the club decided.", ["NA"]),     # the substring rule credits 'NA' inside "manager"
    ("It was created long ago.", ["EA"]),
    ("You can see it there.", ["CA"]),
    ("He did it himself.", ["MS"]),
    ("In 1872 the game began.", ["IN"]),              # short aliases match case-sensitively
    ("Grosset", ["Grosseto"]),                        # whole words only
])
def test_no_match_inside_words_or_in_other_case(answer, refs):
    assert not grade("Where?", answer, refs).correct


@pytest.mark.parametrize("answer, refs", [
    ("UK", ["UK"]),
    ("It was made in the UK.", ["UK"]),
    ("Russell T. Davies", NEW),                       # punctuation inside a name
    ("Konigsberg", ["Königsberg"]),                   # accents dropped on both sides
    ("ＵＫ", ["UK"]),                                  # NFKC (full-width letters)
    ("Soviet Union", ["the Soviet Union"]),           # a leading "the" is ignored
    ("The answer now is GROSSETO.", ["Grosseto"]),    # long aliases ignore case
])
def test_matches(answer, refs):
    assert grade("Where?", answer, refs).correct


# ---------------------------------------------------------------------------- what decides

def test_explicit_conclusion_decides_over_earlier_mentions():
    g = grade("Now, Which country was roller derby created in? Let's think step by step.",
              "The sport started in Serbia. It moved around a lot. So the answer is: India.", ["Serbia"], ["USA"])
    assert not g.correct and not g.asserts_old and g.rule.startswith("conclusion")
    assert "India" in g.rule  # the deciding span is quoted


def test_conclusion_asserting_old_is_not_correct_even_after_new():
    g = grade(Q, "Blake's 7 was created by Russell T Davies. So the answer is Terry Nation.", NEW, OLD)
    assert not g.correct and g.asserts_old and g.asserts_new and g.self_refutes


def test_sft_format_conclusion():
    g = grade(Q, "<think>\nOld fact: Terry Nation.\nUpdated fact: Russell T Davies.\n</think>\n"
                 "The answer now is Russell T Davies.", NEW, OLD)
    assert g.correct and not g.asserts_old and g.rule.startswith("conclusion") and not g.self_refutes


def test_final_answer_line_decides():
    assert grade(Q, "Thinking about the show and its history.\nAnswer: Russell T Davies", NEW, OLD).correct


def test_weak_conclusion_only_when_it_names_an_answer():
    g = grade(Q, "Blake's 7 was created by Russell T Davies. So, let's move on to the next step.", NEW, OLD)
    assert g.correct and g.rule.startswith("first answer")


def test_first_sentence_that_answers_the_question():
    # The first mention does not answer (another role); the later sentence names the relation.
    g = grade(Q, "Russell T Davies was a British mathematician who made many contributions to logic and to "
                 "philosophy. Later, the BBC said the show Blake's 7 was created by Terry Nation in 1978.", NEW, OLD)
    assert not g.correct and g.asserts_old and g.rule.startswith("first answer")


def test_bare_answer():
    g = grade(Q, "Russell T Davies", NEW, OLD)
    assert g.correct and g.asserts_new


@pytest.mark.parametrize("answer", [
    "Blake's 7 was not created by Russell T Davies.",
    "It was created by Terry Nation, not Russell T Davies.",
    "Russell T Davies is not the creator of Blake's 7.",
    "Blake's 7 was created by Terry Nation instead of Russell T Davies.",
    "Blake's 7 was created by Terry Nation rather than Russell T Davies.",
    "Blake's 7 is no longer credited to Russell T Davies.",
    "Was Blake's 7 created by Russell T Davies?",                          # a question
    "Blake's 7 was created by either Russell T Davies or Terry Nation.",     # alternatives
    "Who created it?\n(A) Russell T Davies (B) Terry Nation",               # options
    "1. The creator could be Russell T Davies\n2. The creator could be Terry Nation\n3. The creator could be the BBC",
    "If Blake's 7 was created by Russell T Davies, the story would differ.",  # a supposition
    "Blake's 7 was created by the Russell T Davies Foundation.",            # part of a longer name
])
def test_mentions_that_are_not_assertions(answer):
    assert not grade(Q, answer, NEW, []).correct


def test_possessive_is_not_the_answer():
    g = grade("Now, What is the capital of Japan? Let's think step by step.",
              "So, the correct answer would be Tokyo's sister city, Kyoto.", ["Bondi Junction"], ["Tokyo"])
    assert not g.correct and not g.asserts_old


def test_change_from_old_to_new():
    g = grade("Now, What is the capital of India? Let's think step by step.",
              "Key points:\n1. India's capital moved from New Delhi to Grosseto", ["Grosseto"], ["New Delhi"])
    assert g.correct and not g.asserts_old


def test_self_refutation_needs_a_later_negation_or_an_old_conclusion():
    g = grade(Q, "Blake's 7 was created by Russell T Davies. However, Russell T Davies is not the creator; "
                 "it was Terry Nation.", NEW, OLD)
    assert g.asserts_new and g.negates_new and not g.correct and g.self_refutes
    recovered = grade(Q, "Blake's 7 was created by Russell T Davies. Is Russell T Davies wrong? "
                         "No. The answer is Russell T Davies.", NEW, OLD)
    assert recovered.correct and not recovered.self_refutes


# ---------------------------------------------------------------------------- old answers of MQuAKE cases

def _case():
    return {"case_id": 1, "answer": "Europe", "answer_alias": ["Old Continent"],
            "requested_rewrite": [{"target_new": {"str": "Russell T Davies"}, "target_true": {"str": "Terry Nation"}}],
            "single_hops": [{"answer": "Terry Nation", "answer_alias": ["Terence Joseph Nation"]}],
            "new_single_hops": [{"answer": "Russell T Davies", "answer_alias": []},
                                {"answer": "Wales", "answer_alias": []}]}


def test_old_refs_for():
    c = _case()
    assert old_refs_for(c, 0) == ["Terry Nation", "Terence Joseph Nation"]  # the edited hop: target_true + alias
    assert old_refs_for(c, 1) == []                                        # an unedited hop
    assert old_refs_for(c, None) == ["Europe", "Old Continent"]            # multi-hop: the original answer


def test_stored_old_refs_with_and_without_the_dataset():
    rec = {"case_id": 1, "requested_rewrite": [{"target_new": "Russell T Davies", "target_true": {"str": "Terry Nation"}}],
           "post": {"hop_wise_pred": [[{"ref": ["Russell T Davies"]}], [{"ref": ["Wales"]}]], "accuracy_pred": [{}]}}
    bare = stored_old_refs([rec])
    assert bare == {(1, "hop_wise_pred[0][0]"): ["Terry Nation"], (1, "hop_wise_pred[1][0]"): [],
                    (1, "accuracy_pred[0]"): []}
    full = stored_old_refs([rec], [_case()])
    assert full[(1, "hop_wise_pred[0][0]")] == ["Terry Nation", "Terence Joseph Nation"]
    assert full[(1, "accuracy_pred[0]")] == ["Europe", "Old Continent"]


# ---------------------------------------------------------------------------- against the hand labels

def test_validation_set_shape():
    rows = load_labels()
    assert len(rows) >= 200 and len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["label"], bool) and isinstance(r["label_old"], bool) for r in rows)
    assert not any(r["label"] and r["label_old"] for r in rows)
    assert set(Counter(r["method"] for r in rows)) == {"PreEdited", "InContext", "LoRA", "CaKE", "CausalEdit"}
    assert set(Counter(r["kind"] for r in rows)) == {"hop", "multi"}
    assert set(Counter(r["length"] for r in rows)) == {"short", "long"}
    assert sum(r["heldout"] for r in rows) == round(len(rows) / 10)


def test_strict_grader_agrees_with_hand_labels():
    """The Done-when of the strict grader: >= 95% agreement on all labels, >= 90% on the held-out
    tenth (set aside while the rules were written), precision >= 0.9."""
    rows = load_labels()
    table = {(a.judge, a.split): a for a in agreement_table(rows, judge_verdicts(rows))}
    strict, held = table[("strict", "all")], table[("strict", "held-out")]
    assert strict.n == len(rows) and held.n == sum(r["heldout"] for r in rows)
    assert strict.agree >= 0.95 and held.agree >= 0.90 and strict.precision >= 0.90
    assert table[("strict asserts_old", "all")].agree >= 0.95
    # The reference's substring rule is the instrument this replaces: it must measure worse here.
    assert table[("substring", "all")].precision < strict.precision


def test_agreement_counts_hand_computed():
    rows = [{"id": str(i), "question": "q", "answer": "a", "refs": ["x"], "label": y, "heldout": i == 0}
            for i, y in enumerate([True, True, False, False])]
    table = agreement_table(rows, {"j": [True, False, True, False]})
    a = next(t for t in table if t.split == "all")
    assert (a.n, a.agree, a.precision, a.recall, a.tp, a.fp, a.fn) == (4, 0.5, 0.5, 0.5, 1, 1, 1)
    h = next(t for t in table if t.split == "held-out")
    assert (h.n, h.agree) == (1, 1.0)


def test_judge_agreement_cli_with_an_endpoint(tmp_path, capsys):
    """An endpoint judge is asked once per labelled answer and scored; this fake passes everything."""
    all_rows = load_labels()
    rows = [r for r in all_rows if r["label"]][:6] + [r for r in all_rows if not r["label"]][:6]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from eval.__main__ import main
    with FakeOpenAI(lambda req: chat_reply("<verification>PASS</verification>")) as srv:
        assert main(["judge-agreement", "--labels", str(labels), "--base-url", srv.base_url,
                     "--judge-model", "fake", "--json", str(tmp_path / "t.json")]) == 0
        assert len(srv.requests) == len(rows)
    out = capsys.readouterr().out
    assert "llm:fake" in out and "strict" in out and "substring" in out
    t = {(a["judge"], a["split"]): a for a in json.loads((tmp_path / "t.json").read_text())}
    assert t[("llm:fake", "all")]["recall"] == 1.0
    assert t[("llm:fake", "all")]["agree"] == pytest.approx(sum(r["label"] for r in rows) / len(rows))


def test_unlabelled_rows_are_an_error(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps({"id": "v1", "question": "q", "answer": "a", "refs": [], "label": None}) + "\n")
    with pytest.raises(ValueError, match="v1"):
        load_labels(p)


# ---------------------------------------------------------------------------- python -m eval grade

def _run(args):
    from eval.__main__ import main
    return main(args)


def test_grade_cli(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": 1, "question": Q, "answer": "So the answer is Russell T Davies.", "refs": NEW, "old_refs": OLD},
            {"id": "b", "question": Q, "answer": "Terry Nation created it.", "refs": NEW, "old_refs": OLD, "extra": 7},
            {"id": 3, "question": Q, "answer": "The manager knows.", "refs": ["NA"]}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert _run(["grade", "--input", str(inp), "--output", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, "b", 3] and got[1]["extra"] == 7
    assert [(g["correct"], g["asserts_old"]) for g in got] == [(True, False), (False, True), (False, False)]
    assert all(isinstance(g["rule"], str) and g["rule"] for g in got)
    assert "graded 3 answers: 1 correct, 1 assert the old answer" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: invalid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"question": "q", "answer": "a", "refs": []}', "line 2: missing field 'id'"),
    ('{"id": 1, "question": "q", "refs": []}', "line 2: missing field 'answer'"),
    ('{"id": 1, "question": "q", "answer": 5, "refs": []}', "line 2: field 'answer' must be str"),
    ('{"id": 1, "question": "q", "answer": "a", "refs": "x"}', "line 2: field 'refs' must be list"),
    ('{"id": 1, "question": "q", "answer": "a", "refs": [1]}', "line 2: field 'refs' must be a list of strings"),
    ('{"id": 1, "question": "q", "answer": "a", "refs": [], "old_refs": [null]}', "field 'old_refs'"),
])
def test_grade_cli_malformed(tmp_path, capsys, line, message):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"id": 0, "question": "q", "answer": "a", "refs": ["a"]})
    inp.write_text(good + "\n" + line + "\n")
    assert _run(["grade", "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(inp) in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [inp]  # nothing half-written


def test_grade_cli_missing_input(tmp_path, capsys):
    assert _run(["grade", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_labels_file_default_exists():
    assert LABELS.exists()


def test_self_refutation_labels_and_measured_reading():
    """The self-refutation labels (docs/grading.md) are complete, and the grader's reading stays at least
    where it was measured (recall 5 of 6, precision 5 of 10): a guard against regressions, not a target."""
    from eval.agreement import SRR_LABELS, srr_agreement
    rows = load_labels(SRR_LABELS, ("asserts_new", "self_refutes"))
    assert len(rows) >= 50 and not any(r["self_refutes"] and not r["asserts_new"] for r in rows)
    asserts, refutes = srr_agreement(rows)
    assert refutes.n == len(rows) and refutes.tp + refutes.fn == sum(r["self_refutes"] for r in rows)
    assert refutes.recall >= 0.8 and refutes.precision >= 0.45 and asserts.agree >= 0.65


def test_hostile_cases():
    """The reviewer's hard cases, every one counted: each clean reasoning-format answer (groups sft,
    sft-nofinal: what the method's SFT teaches) is graded right, and at least 88% of all of them (measured
    158 of 179, 88.3%: docs/grading.md says which kinds it misses)."""
    from grade_cases import C
    wrong, sft_wrong = [], []
    for i, case in enumerate(C):
        group, q, a, refs, old, correct, asserts_old = case[:7]
        g = grade(q, a, refs, old)
        ok = (g.correct, g.asserts_old) == (correct, asserts_old) and (len(case) < 8 or g.self_refutes == case[7])
        if not ok:
            (sft_wrong if group.startswith("sft") else wrong).append((i, group, g.rule))
    assert not sft_wrong, sft_wrong
    assert 1 - len(wrong) / len(C) >= 0.88, wrong


SFT_THINK = ("<think>\nOld fact: Blake's 7 was created by Terry Nation.\nReason for change: a court reassigned the "
             "credit.\nUpdated fact: Blake's 7 was created by Russell T Davies.\nDerivation: the question asks "
             "for the creator.\n</think>\n")


@pytest.mark.parametrize("answer, correct, old, rule", [
    ("Russell T Davies", True, False, "first answer"),
    ("Blake's 7 was created by Russell T Davies. So the answer is Terry Nation.", False, True, "conclusion"),
    (SFT_THINK + "The answer now is Russell T Davies.", True, False, "conclusion"),
    (SFT_THINK, True, False, "conclusion"),                                  # no closing line: Updated fact
    ("It was created by Terry Nation, not Russell T Davies.", False, True, "first answer"),
    ("Originally, Blake's 7 was created by Terry Nation. Now it is credited to Russell T Davies.", True, False,
     "first answer"),
    ("Blake's 7 was created by either Russell T Davies or Terry Nation.", False, False, "no answer"),
    ("Russell T Davies is a Welsh screenwriter. Blake's 7 was created by Terry Nation.", False, True, "first answer"),
    ("If Blake's 7 was created by Russell T Davies, the story would differ.", False, False, "no answer"),
    ("The answer now is Russell T Davies.\nI hope this answer is helpful!", True, False, "conclusion"),
])
def test_docs_examples(answer, correct, old, rule):
    """The examples table of docs/grading.md "Rules", verdict for verdict."""
    g = grade(Q, answer, NEW, OLD)
    assert (g.correct, g.asserts_old) == (correct, old) and g.rule.startswith(rule), g.rule

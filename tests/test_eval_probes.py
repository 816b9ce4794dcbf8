"""eval.probes: the probes of docs/method.md 4.2 for a real MQuAKE-hard case (counts and exact forms),
the `post` dict and the string-match res.json, with a pure-Python answer function."""
import copy
import json
from pathlib import Path

import pytest

from eval import probes as P
from eval.mquake import attach_articles, load_articles, load_mquake

DATA = Path(__file__).resolve().parents[1] / "eval" / "data"
PREFIX = ("Use the following article as authoritative updated knowledge for answering the question. "
          "It is an absolute fact. Do not doubt whether it is true.")


@pytest.fixture(scope="module")
def case():
    cases = [c for c in load_mquake(DATA / "MQuAKE-hard.json") if c["case_id"] == 7663]
    merged, missing = attach_articles(cases, load_articles(DATA / "MQuAKE-hard_articles_dev.json"))
    assert missing == []
    return merged[0]


def by_source(probes, source):
    return [p for p in probes if p.source == source]


def test_counts(case):
    probes = P.build_probes(case)
    counts = {s: len(by_source(probes, s)) for s in
              (P.HOP, P.HOP_CE, P.MULTI, P.CONFLICT, P.CONFLICT_CE, P.OLD)}
    # 4 hops x 3, 4 hops x 3, 3 questions, 4 rewrites x 8, 4 x 8, 4 x 2
    assert counts == {P.HOP: 12, P.HOP_CE: 12, P.MULTI: 3, P.CONFLICT: 32, P.CONFLICT_CE: 32, P.OLD: 8}
    assert len(probes) == 99


def test_hop_and_multihop_forms(case):
    probes = P.build_probes(case)
    hop = by_source(probes, P.HOP)
    # Hop 3 of case 7663: "What is the capital of India?" -> Grosseto (edited by rewrite 3).
    assert [p.prompt for p in hop[9:12]] == [
        "Now, The capital of India is ? Let's think step by step.",
        "Now, What is the capital of India? Let's think step by step.",
        "Now, What is the capital of India? Why? Let's think step by step.",
    ]
    assert [p.q for p in hop[9:12]] == ["The capital of India is", "What is the capital of India?",
                                        "What is the capital of India?"]
    assert hop[9].ref == ["Grosseto"]  # answer_alias [] + [answer]
    assert hop[3].ref == case["new_single_hops"][1]["answer_alias"] + ["rugby union"]
    multi = by_source(probes, P.MULTI)
    assert [p.prompt for p in multi] == [f"Now, {q} Let's think step by step." for q in case["questions"]]
    assert multi[0].prompt.startswith("Now, What is the capital city of the country of origin")
    assert all(p.ref == ["Grosseto"] for p in multi)


def test_causal_enhanced_hops_carry_the_matching_article(case):
    probes = P.build_probes(case)
    plain, ce = by_source(probes, P.HOP), by_source(probes, P.HOP_CE)
    for h, hop in enumerate(case["new_single_hops"]):
        # independent mapping: the rewrite whose target_new string equals the hop's answer
        (r,) = [i for i, rw in enumerate(case["requested_rewrite"]) if rw["target_new"]["str"] == hop["answer"]]
        article = case["requested_rewrite"][r]["article"]
        for k in range(3):
            assert ce[3 * h + k].prompt == f"{PREFIX}\n\n{article}\n\n{plain[3 * h + k].prompt}"
            assert ce[3 * h + k].ref == plain[3 * h + k].ref and ce[3 * h + k].hop == h


def test_target_normalisation_and_unedited_hops(case):
    c = copy.deepcopy(case)
    c["requested_rewrite"][1]["target_new"]["str"] = " Rugby  Union. "  # normalises to "rugby union"
    c["new_single_hops"][3]["answer"] = "Rome"                       # hop 3 no longer edited
    probes = P.build_probes(c)
    ce, plain = by_source(probes, P.HOP_CE), by_source(probes, P.HOP)
    assert ce[3].prompt.startswith(PREFIX) and c["requested_rewrite"][1]["article"] in ce[3].prompt
    assert [p.prompt for p in ce[9:12]] == [p.prompt for p in plain[9:12]]  # no prefix, no article
    assert P.normalize_answer("  U.K.\t Rugby-union! ") == "uk rugbyunion"


def test_conflict_and_old_knowledge_forms(case):
    probes = P.build_probes(case)
    rw = case["requested_rewrite"][0]
    old, new, s = "Graham Arnold", "Antonio Conte", "Sydney FC"
    tell, ans = f"Tell me about {s} first, and then answer.", f"Answer first, and then tell me about {s}."
    q, cloze = "Who is the head coach of Sydney FC?", "The head coach of Sydney FC is"
    expected = [f"{q}\n(A) {old} (B) {new}\n{tell}", f"{q}\n(A) {old} (B) {new}\n{ans}",
                f"{q}\n(A) {new} (B) {old}\n{tell}", f"{q}\n(A) {new} (B) {old}\n{ans}",
                f"{cloze} {old} or {new}? {tell}", f"{cloze} {old} or {new}? {ans}",
                f"{cloze} {new} or {old}? {tell}", f"{cloze} {new} or {old}? {ans}"]
    conflict = by_source(probes, P.CONFLICT)
    assert [p.prompt for p in conflict[:8]] == expected
    assert all(p.ref == [new] and p.rewrite == 0 for p in conflict[:8])
    assert conflict[8].ref == ["rugby union"] and conflict[31].rewrite == 3
    ce = by_source(probes, P.CONFLICT_CE)
    assert [p.prompt for p in ce[:8]] == [f"{PREFIX}\n\n{rw['article']}\n\n{e}" for e in expected]
    oldp = by_source(probes, P.OLD)
    assert [p.prompt for p in oldp[:2]] == [
        f"Now it is {new}. Before the update, {cloze} ? Let's think step by step.",
        f"Now the answer is {new}. Before the update, {q} Let's think step by step."]
    assert all(p.ref == [old] for p in oldp[:2])
    assert oldp[7].ref == ["New Delhi"]


def test_rewrite_without_article_gets_plain_ce_copies(case):
    c = copy.deepcopy(case)
    del c["requested_rewrite"][2]["article"]
    probes = P.build_probes(c)
    plain, ce = by_source(probes, P.CONFLICT), by_source(probes, P.CONFLICT_CE)
    assert [p.prompt for p in ce[16:24]] == [p.prompt for p in plain[16:24]]
    assert ce[15].prompt.startswith(PREFIX)


def fake_answers(calls):
    """Answers that name the first gold string, except for Why? questions, old-knowledge probes and
    the third multi-hop question, which get an answer naming nothing."""
    def answer(prompts):
        calls.append(list(prompts))
        out = []
        for p in prompts:
            if "Why?" in p or "Before the update" in p or "located?" in p:
                out.append("I am not sure.")
            elif "(A)" in p or " or " in p:
                out.append("It is antonio conte." if "Sydney FC" in p else "No idea.")
            elif "capital" in p:
                out.append("The answer now is GROSSETO.")
            elif "sport" in p:
                out.append("The answer now is Rugby Union.")
            elif "country" in p or "created" in p:
                out.append("It was created in india")
            else:
                out.append("The answer now is Antonio Conte.")
        return out
    return answer


def test_evaluate_case_post_dict(case):
    before = copy.deepcopy(case)
    calls = []
    post = P.evaluate_case(None, None, case, answer_fn=fake_answers(calls))
    assert case == before
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 99  # one batch, every prompt distinct
    assert post["hop_wise"] == [[True, True, False]] * 4
    assert post["accuracy"] == [True, True, False]
    assert set(post) == {"hop_wise", "hop_wise_pred", "accuracy", "accuracy_pred", "conflict_probe",
                         "causal_enhanced_hop_wise_pred", "causal_enhanced_conflict_probe", "old_knowledge_probe"}
    item = post["hop_wise_pred"][2][0]
    assert item == {"q": "rugby union was created in the country of",
                    "prompt": "Now, rugby union was created in the country of ? Let's think step by step.",
                    "ref": case["new_single_hops"][2]["answer_alias"] + ["India"],
                    "pred": "It was created in india", "old_ref": ["England", "ENG"]}
    assert len(post["causal_enhanced_hop_wise_pred"]) == 4 and all(len(h) == 3 for h in post["causal_enhanced_hop_wise_pred"])
    assert len(post["conflict_probe"]) == 32 and set(post["conflict_probe"][0]) == {"prompt", "ref", "pred"}
    assert post["conflict_probe"][0]["pred"] == "It is antonio conte."
    assert len(post["old_knowledge_probe"]) == 8
    assert post["accuracy_pred"][2]["pred"] == "I am not sure."
    json.dumps(post)  # storable as is


def test_duplicate_prompts_asked_once(case):
    c = copy.deepcopy(case)
    for rw in c["requested_rewrite"]:
        rw.pop("article")
    calls = []
    post = P.evaluate_case(None, None, c, answer_fn=fake_answers(calls))
    assert len(calls[0]) == 99 - 12 - 32  # CE copies without an article equal the plain prompts
    assert post["causal_enhanced_hop_wise_pred"] == post["hop_wise_pred"]


def test_answer_matches_rule():
    assert P.answer_matches("The answer now is GROSSETO.", ["Grosseto"])
    assert P.answer_matches("x Fab Four y", ["The Beatles", "Fab Four"])
    assert not P.answer_matches("nothing", ["", "  "])   # empty aliases never match
    assert not P.answer_matches("Grosset", ["Grosseto"])


def _rec(cid, hop_wise, acc):
    return {"case_id": cid, "requested_rewrite": [], "time": 1.0, "post": {"hop_wise": hop_wise, "accuracy": acc}}


def test_string_match_summary_hand_computed():
    recs = [_rec(1, [[True, False, False], [True, True, True]], [False, True, False]),   # 4/6, any
            _rec(2, [[False, False, False]], [False, False, False]),                     # 0/3, none
            _rec(3, [[True, True, False], [True, False, False]], [True, True, True])]     # 3/6, any
    res = P.string_match_summary(recs)
    assert res["total_cases"] == 3
    assert res["overall_hop_wise_average"] == pytest.approx((4 / 6 + 0 + 3 / 6) / 3)
    assert res["accuracy_averages"]["qa"] == pytest.approx(2 / 3)
    assert isinstance(res["overall_hop_wise_average"], float)


def test_record_case_atomic_replace_and_res(tmp_path, case):
    post = P.evaluate_case(None, None, case, answer_fn=fake_answers([]))
    rec = P.case_record(case, post, 12.5)
    assert rec["requested_rewrite"][0]["target_new"] == "Antonio Conte"
    assert case["requested_rewrite"][0]["target_new"] == {"str": "Antonio Conte", "id": "Q26580"}
    P.record_case(tmp_path, rec)
    P.record_case(tmp_path, _rec(1, [[True]], [True]))
    P.record_case(tmp_path, rec)  # rerun of the same case replaces it
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["case_id"] for r in stored] == [1, 7663]
    res = json.loads((tmp_path / "res.json").read_text())
    # strict: case 7663's hops are 2 of 3 right (Why? answers name nothing), its multi-hop questions
    # 2 of 3; case 1 stores no answers, so the strict means are over case 7663 alone.
    assert res == {"total_cases": 2, "overall_hop_wise_average": pytest.approx((1 + 8 / 12) / 2),
                   "accuracy_averages": {"qa": 1.0},
                   "strict": {"overall_hop_wise_average": pytest.approx(2 / 3),
                              "accuracy_averages": {"qa": pytest.approx(2 / 3), "any_right_accuracy": 1.0}}}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Comp:
    def __init__(self, i, toks):
        self.prompt_index, self.sample_index, self.tokens = i, 0, toks
        self.logprobs, self.finish_reason = [0.0] * len(toks), "stop"


class _Tok:
    eos_ids = [0]

    def chat(self, messages, add_generation_prompt=True):
        return "<u>" + messages[0]["content"] + "<a>"

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in self.eos_ids))


def test_model_answer_fn_batches_and_restores_order(monkeypatch):
    import model
    seen = []

    def fake_generate(m, prompts, *, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                      num_samples, stop_ids, seed):
        seen.append((len(prompts), temperature, repetition_penalty, max_new_tokens, stop_ids))
        # answer = the prompt text reversed, then EOS
        return [_Comp(i, list(reversed(p)) + [0]) for i, p in enumerate(prompts)]

    monkeypatch.setattr(model, "generate", fake_generate, raising=False)
    fn = P.model_answer_fn(object(), _Tok(), P.GenConfig(batch_size=2))
    prompts = ["ccc", "a", "bbbbbb", "dd", "e"]
    assert fn(prompts) == [("<u>" + p + "<a>")[::-1] for p in prompts]
    assert [s[0] for s in seen] == [2, 2, 1]
    assert seen[0][1:] == (0.0, 1.1, 768, [0])


def test_evaluate_case_with_tiny_random_model(case):
    """The real engine: every probe answered, and answers equal a naive full-forward greedy loop."""
    import torch
    from model import load_model, load_tokenizer

    model, tok = load_model("tiny-random", device="cpu"), load_tokenizer("tiny-random")
    gen = P.GenConfig(max_new_tokens=4, repetition_penalty=1.0, batch_size=40)
    post = P.evaluate_case(model, tok, case, gen)
    assert [len(h) for h in post["hop_wise_pred"]] == [3, 3, 3, 3] and len(post["conflict_probe"]) == 32
    assert len(post["old_knowledge_probe"]) == 8 and len(post["accuracy_pred"]) == 3

    def naive(prompt):
        ids = tok.encode(tok.chat([{"role": "user", "content": prompt}]))
        out = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                out.append(nxt)
                if nxt in tok.eos_ids:
                    break
        return tok.decode(out, skip_special_tokens=True).strip()

    for d in (post["hop_wise_pred"][0][0], post["accuracy_pred"][2], post["causal_enhanced_conflict_probe"][5]):
        assert d["pred"] == naive(d["prompt"])
    assert post["hop_wise"][0][0] == P.answer_matches(post["hop_wise_pred"][0][0]["pred"], post["hop_wise_pred"][0][0]["ref"])

"""eval.analyze: rewrite mapping, self-refutation flags and SRR on a hand-built metrics.json (fake
LLM judge and rule-based), old-knowledge probes, ERROR items, rationale alignment, extract-ce and
the exact McNemar comparison."""
import json

import pytest

from eval import analyze as A
from eval.chat import ChatClient
from eval.judge import Backend
from eval.probes import CE_PREFIX, conflict_prompts
from eval_fakes import FakeOpenAI, chat_reply

ARTICLE = "<h1>N{r} now</h1><p>S{r} switched to N{r} because a merger closed the old supplier in March.</p>"


def rewrite(r):
    return {"prompt": "The answer for {} is", "subject": f"Subj{r}", "question": f"What is the answer for Subj{r}?",
            "target_new": f"New{r}", "target_true": {"str": f"Old{r}", "id": "Q1"}, "article": ARTICLE.format(r=r)}


def hop_items(r, preds):
    q = f"What is the answer for Subj{r}?"
    prompts = [f"Now, The answer for Subj{r} is ? Let's think step by step.", f"Now, {q} Let's think step by step.",
               f"Now, {q} Why? Let's think step by step."]
    return [{"q": q, "prompt": p, "ref": [f"New{r}", f"N{r} alias"], "pred": x} for p, x in zip(prompts, preds)]


def case(cid, hop_preds, conflict_marks, ce=None):
    """Two rewrites, their edited hops, one unedited hop, 16 conflict probes (8 per rewrite, `conflict_marks`
    maps index -> pred) and 4 old-knowledge probes. `ce` = (hop_preds, conflict_marks) for the CE copies."""
    rws = [rewrite(0), rewrite(1)]

    def conflicts(marks):
        return [{"prompt": p, "ref": [f"New{k // 8}"], "pred": marks.get(k, "neutral")}
                for k, p in enumerate(conflict_prompts(dict(rws[0], target_new="New0")) +
                                      conflict_prompts(dict(rws[1], target_new="New1")))]
    unedited = [{"q": "x", "prompt": "Now, Where is the lake? Let's think step by step.", "ref": ["Geneva"], "pred": "<A>"}] * 3
    post = {"hop_wise": [[True] * 3] * 3,
            "hop_wise_pred": [hop_items(0, hop_preds[0]), hop_items(1, hop_preds[1]), unedited],
            "accuracy": [True], "accuracy_pred": [{"q": "m", "prompt": "m", "ref": ["New1"], "pred": "<A><SR>"}],
            "conflict_probe": conflicts(conflict_marks),
            "old_knowledge_probe": [{"prompt": f"Now it is New{k // 2}. Before the update, ...", "ref": [f"Old{k // 2}"],
                                     "pred": f"It was Old{k // 2}." if k != 3 else "No idea."} for k in range(4)]}
    if ce is not None:
        post["causal_enhanced_hop_wise_pred"] = [hop_items(0, ce[0][0]), hop_items(1, ce[0][1]), unedited]
        for h in post["causal_enhanced_hop_wise_pred"][:2]:
            for d in h:
                d["prompt"] = f"{CE_PREFIX}\n\nart\n\n{d['prompt']}"
        post["causal_enhanced_conflict_probe"] = conflicts(ce[1])
    return {"case_id": cid, "requested_rewrite": rws, "time": 1.0, "post": post}


N = "plain"
# Hand-built truth (markers: <A> = asserts Target_New, <SR> = self-refutes, [garbage] = judge reply unparseable):
#   10|rw0: hop asserts; conflict #1 (answer-first) self-refutes    -> asserted, cp, combined
#   10|rw1: hop Why? answer asserts and self-refutes                 -> asserted, hop, combined, combined_tell
#   11|rw0: no assertion; conflict #0 (tell-first) self-refutes       -> cp, cp_tell, combined, combined_tell
#   11|rw1: hop asserts, nothing else                                 -> asserted only
#   12|rw0, 12|rw1: every item unparseable                            -> ERROR, rewrites left out
CASES = [
    case(10, [["<A>", N, N], [N, N, "<A><SR>"]], {1: "<SR>", 3: "[garbage]"},
         ce=([[N, "<A>", N], [N, N, "<A><SR>"]], {})),
    case(11, [[N, N, N], [N, "<A>", N]], {0: "<SR>"},
         ce=([[N, N, N], ["<A>", N, N]], {9: "<SR>"})),
]
ERR_CASE = case(12, [["[garbage]"] * 3, ["[garbage]"] * 3], {k: "[garbage]" for k in range(16)})


def sr_judge(req):
    text = req.user_text
    pred = text.split("Answer text:\n", 1)[1]
    if "[garbage]" in pred:
        return chat_reply("I refuse to produce JSON")
    a, sr = "<A>" in pred, "<SR>" in pred
    body = {"reasoning": "r", "analysis": {"assertion_of_target_new": a or sr, "explicit_negation_of_target_new": sr,
                                           "final_submitted_answer_target_new": not sr},
            "self_refutation_detected": sr, "evidence": "e"}
    return chat_reply("Here you go:\n" + json.dumps(body) + "\nDone.")


def llm(srv, workers=3):
    return Backend(ChatClient(srv.base_url, "fake-sr", [], timeout=5, max_retries=1, backoff=0.001), workers)


def write(tmp_path, records, name="run"):
    run = tmp_path / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps(records))
    return run / "metrics.json"


def test_items_mapping_and_old_knowledge_not_crashing():
    items, skipped = A.self_refute_items(CASES)
    by_src = {}
    for it in items:
        by_src.setdefault(it.source, []).append(it)
    assert len(by_src["hop_wise_pred"]) == 12 and len(by_src["conflict_probe"]) == 32
    assert skipped == {"old_knowledge_probe (not a self-refutation item)": 8, "hop_wise_pred on an unedited hop": 6}
    assert [it.extra["rewrite_idx"] for it in by_src["conflict_probe"][:16]] == [0] * 8 + [1] * 8
    assert [it.extra["tell_first"] for it in by_src["conflict_probe"][:8]] == [True, False] * 4
    # subject fallback: a hop whose refs match no target but whose prompt names Subj1
    d = {"prompt": "Now, Who founded subj1? Let's think", "ref": ["Nobody"]}
    assert A.hop_item_rewrite(d, CASES[0]["requested_rewrite"]) == 1


def test_srr_with_fake_llm_judge_hand_computed(tmp_path):
    path = write(tmp_path, CASES + [ERR_CASE])
    with FakeOpenAI(sr_judge) as srv:
        res = A.run_analyze(path, llm(srv), progress=False)
    s = res["summary"]
    assert res["judge"] == "llm:fake-sr"
    assert s["rewrites"] == 4                       # case 12 is all ERROR: left out, not counted as "no"
    assert res["item_errors"] == 1 + 3 + 3 + 16 and res["rewrites_with_errors"] == 3
    u = {k: (v["yes"], v["total"]) for k, v in s["unconditional"].items()}
    assert u == {"conflict_probe": (2, 4), "conflict_probe_tell_me_about_first": (1, 4), "hop_wise_pred": (1, 4),
                 "combined": (3, 4), "combined_tell_me_about_first": (2, 4)}
    assert (s["asserted_rewrites"]["yes"], s["asserted_rewrites"]["total"]) == (3, 4)
    c = {k: (v["yes"], v["total"]) for k, v in s["conditional_on_assertion"].items()}
    assert c == {"conflict_probe": (1, 3), "conflict_probe_tell_me_about_first": (0, 3), "hop_wise_pred": (1, 3),
                 "combined": (2, 3), "combined_tell_me_about_first": (1, 3)}
    assert s["SRR"] == {"yes": 2, "total": 3, "rate": pytest.approx(2 / 3)}
    txt = (path.parent / "analysis" / "pred_analysis.txt").read_text()
    assert f"{A.SRR_LABEL}: 2 / 3 (66.7%)" in txt
    assert "skipped: 12 x old_knowledge_probe" in txt
    # old-knowledge recall: in each of the 3 cases, 3 of the 4 answers name the old fact -> 9/12
    assert res["old_knowledge_recall"]["yes"] == 9 and res["old_knowledge_recall"]["total"] == 12
    stored = json.loads((path.parent / "analysis" / "pred_analysis.json").read_text())
    assert stored["rewrites"]["10|rw1"]["hop_wise_pred"] is True
    assert stored["rewrites"]["10|rw0"]["errors"] == 1
    assert sum(1 for it in stored["items"] if it["result"] == "ERROR") == 23


def test_parse_self_refute():
    good = {"reasoning": "x", "analysis": {"assertion_of_target_new": True, "explicit_negation_of_target_new": True,
                                          "final_submitted_answer_target_new": False},
            "self_refutation_detected": True, "evidence": "quote"}
    assert A.parse_self_refute("```json\n" + json.dumps(good) + "\n```")["self_refutation_detected"] is True
    for bad in ("no json here", '{"analysis": {}}',
                json.dumps(dict(good, self_refutation_detected="true")),
                json.dumps(dict(good, evidence=None)),
                json.dumps(dict(good, analysis=dict(good["analysis"], assertion_of_target_new="yes")))):
        with pytest.raises(ValueError):
            A.parse_self_refute(bad)


@pytest.mark.parametrize("pred, flags, detected", [
    ("The club is based in Lyon. Wait, Lyon is incorrect: it is in Marseille. The answer is Marseille.", (1, 1, 0),
     True),                                                                                   # asserts, negates
    ("It is based in Marseille, not Lyon. The answer is Marseille.", (0, 0, 0), False),       # rational rejection
    ("It was in Marseille until the move; now it is in Lyon. The answer now is Lyon.", (1, 0, 1), False),  # harmonised
    ("It is Lyon. Hmm, Lyon is wrong? No: after the move Lyon holds. The answer now is Lyon.", (1, 1, 1), False),
    ("The club is based in Lyon. It plays at the Velodrome. The answer is Marseille.", (1, 0, 0), True),  # concludes old
])
def test_strict_self_refute(pred, flags, detected):
    from eval.judge import Item
    v = A.strict_self_refute(Item(1, "hop_wise_pred", "p", "Where is the club based?", ["Lyon"], pred, ["Marseille"]))
    got = tuple(int(v["analysis"][k]) for k in ("assertion_of_target_new", "explicit_negation_of_target_new",
                                                   "final_submitted_answer_target_new"))
    assert got == flags
    assert v["self_refutation_detected"] is detected


def test_offline_analyze_cli_is_strict(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CODE_EDIT_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = case(20, [["It is New0.", N, N], [N, N, "New1 it is. But New1 is wrong; the answer is Old1."]], {})
    path = write(tmp_path, [c])
    from eval.__main__ import main
    assert main(["analyze", "--input", str(path), "--llm-self-refute", "on", "--rewrite-why", "on"]) == 0
    out = capsys.readouterr()
    assert "strict offline grader" in out.err
    res = json.loads((path.parent / "analysis" / "pred_analysis.json").read_text())
    assert res["judge"] == "strict" and res["rewrite_why"]["judge"] == "word-overlap"
    assert all(it["method"] == "strict" for it in res["items"])
    assert res["rewrites"]["20|rw1"]["hop_wise_pred"] is True and res["rewrites"]["20|rw0"]["combined"] is False
    assert res["summary"]["SRR"]["yes"] == 1 and res["summary"]["SRR"]["total"] == 2
    assert f"{A.SRR_LABEL}: 1 / 2 (50.0%)" in out.out


def test_rewrite_why_with_fake_llm(tmp_path):
    c1 = case(30, [[N, N, "Because a merger closed the supplier."], [N, N, "Fans voted for it."]], {})
    c2 = case(31, [[N, N, "   "], [N, N, "It just is."]], {})   # empty answer is not a candidate
    del c2["requested_rewrite"][1]["article"]                     # no article: not a candidate
    path = write(tmp_path, [c1, c2])
    verdicts = {"Because a merger": "PASS", "Fans voted": "FAIL"}

    def why_judge(req):
        text = req.user_text.split("### Now judge this one", 1)[1]
        v = next(v for k, v in verdicts.items() if k in text)
        return chat_reply(f"<consistency>{v}</consistency>\n<evidence>e</evidence>\n<reason>r</reason>")

    with FakeOpenAI(why_judge) as srv:
        res = A.run_analyze(path, Backend(None), rewrite_why=llm(srv), progress=False)
    w = res["rewrite_why"]
    assert (w["PASS"], w["FAIL"], w["UNSURE"], w["ERROR"], w["rewrites"]) == (1, 1, 0, 0, 2)
    assert w["mean_rewrite_pass_rate"] == pytest.approx(0.5)
    assert len(srv.requests) == 2
    assert "Article: " + ARTICLE.format(r=0) in srv.requests[0].user_text or \
           "Article: " + ARTICLE.format(r=0) in srv.requests[1].user_text
    stored = json.loads((path.parent / "analysis" / "rewrite_why_consistency_summary.json").read_text())
    assert stored["mean_rewrite_pass_rate"] == pytest.approx(0.5)


def test_parse_why_and_rule_why():
    assert A.parse_why("<consistency>unsure</consistency><evidence>a</evidence><reason>b</reason>")["result"] == "UNSURE"
    with pytest.raises(ValueError):
        A.parse_why("<consistency>PASS</consistency><evidence>a</evidence>")
    art = ARTICLE.format(r=0)
    q = "Now, What is the answer for Subj0? Why? Let's think step by step."
    assert A.rule_why(art, q, "Because a merger closed the old supplier, New0.", ["New0"])["result"] == "PASS"
    assert A.rule_why(art, q, "Because fans voted in a referendum, New0.", ["New0"])["result"] == "FAIL"
    assert A.rule_why(art, q, "New0.", ["New0"])["result"] == "UNSURE"


def test_mcnemar_exact_hand_computed():
    assert A.mcnemar_exact(0, 0) == 1.0
    assert A.mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)           # 0.21875
    assert A.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert A.mcnemar_exact(3, 3) == 1.0
    assert A.mcnemar_exact(2, 9) == pytest.approx(2 * (1 + 11 + 55) / 2048)


def test_extract_ce_and_comparison(tmp_path):
    path = write(tmp_path, CASES, "runA")
    ce_path = A.extract_ce(path)
    assert ce_path == tmp_path / "runA_only_causal_enhanced" / "metrics.json"
    ce = json.loads(ce_path.read_text())
    assert ce[0]["post"]["hop_wise_pred"][1][2]["prompt"].startswith(CE_PREFIX)
    assert ce[0]["post"]["accuracy_pred"] == [] and ce[0]["post"]["old_knowledge_probe"] == []
    with FakeOpenAI(sr_judge) as srv:
        with pytest.raises(FileNotFoundError, match="runA/analysis/pred_analysis.json"):
            A.run_analyze(ce_path, llm(srv), progress=False)
        A.run_analyze(path, llm(srv), progress=False)
        res = A.run_analyze(ce_path, llm(srv), progress=False)
    comp = res["ce_comparison"]
    # denominator = original asserted rewrites {10|rw0, 10|rw1, 11|rw1}; combined: orig (1,1,0) -> CE (0,1,1)
    assert comp["denominator_rewrites"] == 3 and comp["compared"] == 3
    cmb = comp["sources"]["combined"]
    assert (cmb["N00"], cmb["N01"], cmb["N10"], cmb["N11"]) == (0, 1, 1, 1)
    assert cmb["repair_rate"] == pytest.approx(0.5) and cmb["harm_rate"] == pytest.approx(1.0)
    assert cmb["original_rate"] == pytest.approx(2 / 3) and cmb["ce_rate"] == pytest.approx(2 / 3)
    assert cmb["mcnemar_p"] == 1.0
    cp = comp["sources"]["conflict_probe"]  # orig (1,0,0) -> CE (0,0,1)
    assert (cp["N00"], cp["N01"], cp["N10"], cp["N11"]) == (1, 1, 1, 0)
    txt = (tmp_path / "runA_only_causal_enhanced" / "analysis" / "pred_analysis.txt").read_text()
    assert "Causal-enhanced vs original" in txt and "McNemar exact p" in txt

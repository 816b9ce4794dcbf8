"""eval.judge: H-Acc / M-Acc on a hand-built metrics.json, against a scripted fake judge server
(429 + Retry-After, 500s, stall, malformed tags, invalid JSON, a 401 key), offline, and killed/resumed."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from eval import judge as J
from eval.chat import ChatClient
from eval_fakes import FakeOpenAI, Reply, chat_reply

ROOT = Path(__file__).resolve().parents[1]


def _items(prompt, refs, preds):
    return [{"q": prompt, "prompt": f"Now, {prompt} Let's think step by step.", "ref": refs, "pred": p} for p in preds]


def fixture_records(marks: dict | None = None):
    """3 cases x (2 hops x 3 answers + 3 multi-hop answers). `marks` maps (case_idx, path) to a fault
    marker prefixed to that pred; markers never change the substring verdict."""
    spec = [
        # (hop refs, hop preds) x2, (multi refs, multi preds)
        ([(["Paris"], ["It is Paris.", "paris", "London"]), (["Rome", "Roma"], ["Roma!", "Milan", "Milan"])],
         (["Lyon"], ["Lyon", "Nice", "Nice"])),
        ([(["Oslo"], ["Bergen", "Bergen", "Bergen"]), (["Bergen"], ["Bergen", "bergen", "BERGEN"])],
         (["Bergen"], ["Oslo", "Oslo", "Oslo"])),
        ([(["Kyoto"], ["Kyoto", "Kyoto", "Kyoto"]), (["Osaka"], ["Osaka", "Kobe", "Osaka"])],
         (["Osaka"], ["Osaka", "osaka", "Osaka."])),
    ]
    marks = marks or {}
    records = []
    for c, (hops, (mrefs, mpreds)) in enumerate(spec):
        def mark(path, pred):
            return f"{marks[(c, path)]} {pred}" if (c, path) in marks else pred
        hop_pred = []
        for h, (refs, preds) in enumerate(hops):
            items = _items(f"Hop {h} of case {c}?", refs, preds)
            for s, d in enumerate(items):
                d["pred"] = mark(f"hop_wise_pred[{h}][{s}]", d["pred"])
            hop_pred.append(items)
        acc = _items(f"Multi of case {c}?", mrefs, mpreds)
        for s, d in enumerate(acc):
            d["pred"] = mark(f"accuracy_pred[{s}]", d["pred"])
        records.append({"case_id": 100 + c, "requested_rewrite": [], "time": 1.0,
                        "post": {"hop_wise": [], "hop_wise_pred": hop_pred, "accuracy": [], "accuracy_pred": acc,
                                 "conflict_probe": [{"prompt": "x", "ref": ["y"], "pred": "z"}]}})
    return records


# Hand-computed from the fixture (PASS iff a ref is a substring of the answer):
# case 0: hops 2/3 and 1/3 -> 0.5; multi P F F;  case 1: hops 0 and 1 -> 0.5; multi F F F
# case 2: hops 1 and 2/3 -> 5/6; multi P P P
H_ACC = (0.5 + 0.5 + 5 / 6) / 3
QA = (1 / 3 + 0 + 1) / 3
M_ACC = 2 / 3


def write_run(tmp_path, records, name="run"):
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(records))
    return run / "metrics.json"


_SECTION = re.compile(r"### Now grade this one\nQuestion: (.*?)\nGold references:\n(.*?)\nModel response:\n(.*)\nGrading:$",
                      re.DOTALL)


def grading(req):
    """What an honest judge would say about the request: PASS iff a gold ref is in the response."""
    m = _SECTION.search(req.user_text)
    refs = [line[2:] for line in m.group(2).splitlines()]
    pred = m.group(3)
    return pred, ("PASS" if any(r.lower() in pred.lower() for r in refs) else "FAIL")


class FaultyJudge:
    """Per-answer scripted faults, keyed by the marker at the start of the answer."""

    def __init__(self, bad_key=None):
        self.seen = Counter()
        self.lock = threading.Lock()
        self.bad_key = bad_key

    def __call__(self, req):
        if self.bad_key and req.auth == f"Bearer {self.bad_key}":
            return Reply(401, {"error": {"message": "Incorrect API key provided"}})
        pred, verdict = grading(req)
        with self.lock:
            self.seen[pred] += 1
            n = self.seen[pred]
        ok = chat_reply(f"The response commits to an answer. <verification>{verdict}</verification>")
        if pred.startswith("[429]") and n == 1:
            return Reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.05"})
        if pred.startswith("[500x2]") and n <= 2:
            return Reply(500, {"error": {"message": "internal"}})
        if pred.startswith("[stall]") and n == 1:
            return Reply(stall=1.0, body="{}")
        if pred.startswith("[badjson]") and n == 1:
            return Reply(200, '{"choices": [')
        if pred.startswith("[twotags]") and n == 1:
            return chat_reply("<verification>PASS</verification> or <verification>FAIL</verification>")
        if pred.startswith("[notag]"):
            return chat_reply(f"I think it is {verdict.lower()}ed.")
        if pred.startswith("[always500]"):
            return Reply(503, {"error": {"message": "overloaded"}})
        return ok


def backend(srv, keys=(), workers=4):
    return J.Backend(ChatClient(srv.base_url, "fake-judge", list(keys), timeout=0.3, max_retries=2,
                                backoff=0.001, max_backoff=0.01), workers)


def test_parse_verification_strict():
    assert J.parse_verification("reasoning...\n<verification> pass </verification>") == "PASS"
    assert J.parse_verification("<VERIFICATION>FAIL</VERIFICATION>") == "FAIL"
    for bad in ("PASS", "<verification>MAYBE</verification>",
                "<verification>PASS</verification><verification>PASS</verification>"):
        with pytest.raises(ValueError):
            J.parse_verification(bad)


@pytest.mark.parametrize("flags, label", [([], "strict"), (["--substring"], "substring")])
def test_offline_cli(tmp_path, monkeypatch, capsys, flags, label):
    """The fixture's answers are bare names or "It is X.", so both offline rules give the hand-computed
    verdicts (the strict grader's harder cases are in test_grade.py)."""
    monkeypatch.delenv("CODE_EDIT_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = write_run(tmp_path, fixture_records())
    from eval.__main__ import main
    assert main(["judge", "--input", str(path), *flags]) == 0
    out = capsys.readouterr().out
    assert f"judge: {label}" in out and "ERROR items (not scored, re-judged on the next run): 0" in out
    s = json.loads((path.parent / "judge" / "metrics.judged.summary.json").read_text())
    assert s["judge"] == label
    assert s["overall_hop_wise_average"] == pytest.approx(H_ACC)
    assert s["accuracy_averages"]["qa"] == pytest.approx(QA)
    assert s["accuracy_averages"]["any_right_accuracy"] == pytest.approx(M_ACC)
    assert s["items"] == {"total": 27, "PASS": 15, "FAIL": 12, "ERROR": 0, "asserts_old": 0}
    assert "conflict_probe_average" not in s
    judged = json.loads((path.parent / "judge" / "metrics.judged.json").read_text())
    verdict = judged[0]["post"]["hop_wise_pred"][0][2]["judge"]
    assert verdict["result"] == "FAIL" and verdict["method"] == label
    if label == "strict":
        assert verdict["asserts_old"] is False and verdict["rule"] == "no answer asserted"
    assert "judge" not in judged[0]["post"]["conflict_probe"][0]  # conflict probes are not judged


FAULTS = {(0, "hop_wise_pred[0][0]"): "[429]", (0, "hop_wise_pred[1][0]"): "[500x2]",
          (1, "hop_wise_pred[1][1]"): "[stall]", (2, "hop_wise_pred[0][1]"): "[badjson]",
          (2, "accuracy_pred[2]"): "[twotags]", (0, "hop_wise_pred[0][2]"): "[notag]",
          (1, "accuracy_pred[0]"): "[always500]"}


def test_faulty_server_every_item_judged_or_error(tmp_path):
    path = write_run(tmp_path, fixture_records(FAULTS))
    fake = FaultyJudge()
    with FakeOpenAI(fake) as srv:
        s = J.run_judge(path, backend(srv), progress=False)
    judged = json.loads((path.parent / "judge" / "metrics.judged.json").read_text())
    results = [(r["case_id"], d["judge"]["result"]) for r in judged for src in ("hop_wise_pred", "accuracy_pred")
               for _, d in J._walk(r["post"][src], src)]
    assert len(results) == 27 and all(res in ("PASS", "FAIL", "ERROR") for _, res in results)
    assert s["items"] == {"total": 27, "PASS": 15, "FAIL": 10, "ERROR": 2, "asserts_old": 0}
    # exactly the two unrecoverable items are ERROR, with the reason kept
    err = judged[0]["post"]["hop_wise_pred"][0][2]["judge"]
    assert err["result"] == "ERROR" and "unparseable" in err["error"] and "I think" in err["raw"]
    assert judged[1]["post"]["accuracy_pred"][0]["judge"]["result"] == "ERROR"
    assert "HTTP 503" in judged[1]["post"]["accuracy_pred"][0]["judge"]["error"]
    # H-Acc/M-Acc with ERROR left out of the denominators (hand-computed):
    # case 0 hop 0 -> 2/2, so case 0 = (1 + 1/3)/2; case 1 multi: F F + ERROR -> undetermined for M-Acc
    assert s["overall_hop_wise_average"] == pytest.approx(((1 + 1 / 3) / 2 + 0.5 + 5 / 6) / 3)
    assert s["accuracy_averages"]["qa"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert s["accuracy_averages"]["any_right_accuracy"] == pytest.approx(1.0)
    assert s["cases_scored"]["any_right_undetermined"] == 1 and s["cases_with_errors"] == 2
    # bounded retries: exact request count per answer
    per = {"[429]": 2, "[500x2]": 3, "[stall]": 2, "[badjson]": 2, "[twotags]": 2, "[notag]": J.PARSE_ATTEMPTS,
           "[always500]": 3}
    multiplicity = Counter(d["pred"] for r in fixture_records(FAULTS) for src in ("hop_wise_pred", "accuracy_pred")
                           for _, d in J._walk(r["post"][src], src))
    for pred, n in fake.seen.items():
        assert n == multiplicity[pred] * per.get(pred.split(" ")[0], 1), pred
    assert len(srv.requests) == 20 + sum(per.values())
    # a second run re-asks only the ERROR items
    with FakeOpenAI(FaultyJudge()) as srv2:
        J.run_judge(path, backend(srv2), progress=False)
    assert len(srv2.requests) == J.PARSE_ATTEMPTS + 3


def test_bad_key_items_error_then_resume_with_good_key(tmp_path):
    path = write_run(tmp_path, fixture_records())
    with FakeOpenAI(FaultyJudge(bad_key="sk-bad-key-000000")) as srv:
        s1 = J.run_judge(path, backend(srv, keys=["sk-good-key-11111", "sk-bad-key-000000"]), progress=False)
    bad_requests = sum(r.auth == "Bearer sk-bad-key-000000" for r in srv.requests)
    assert s1["items"]["ERROR"] == bad_requests > 0 and s1["items"]["total"] == 27
    assert any("HTTP 401" in k for k in s1["errors"])
    ckpt = (path.parent / "judge" / "metrics.judged.ckpt.jsonl").read_text()
    assert "sk-bad-key" not in ckpt and "sk-good-key" not in ckpt
    assert "sk-bad-key" not in (path.parent / "judge" / "metrics.judged.summary.json").read_text()
    with FakeOpenAI(FaultyJudge()) as srv2:
        s2 = J.run_judge(path, backend(srv2, keys=["sk-good-key-11111"]), progress=False)
    assert len(srv2.requests) == bad_requests
    assert s2["items"] == {"total": 27, "PASS": 15, "FAIL": 12, "ERROR": 0, "asserts_old": 0}
    assert s2["overall_hop_wise_average"] == pytest.approx(H_ACC)


def test_killed_midrun_then_resumed_matches_uninterrupted(tmp_path):
    records = fixture_records()
    with FakeOpenAI(lambda req: (time.sleep(0.05), chat_reply(f"<verification>{grading(req)[1]}</verification>"))[1]) as srv:
        clean = J.run_judge(write_run(tmp_path, records, "clean"), backend(srv, workers=2), progress=False)
        path = write_run(tmp_path, records, "killed")
        ckpt = path.parent / "judge" / "metrics.judged.ckpt.jsonl"
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "CODE_EDIT_API_KEYS")}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.Popen([sys.executable, "-m", "eval", "judge", "--input", str(path), "--base-url",
                                 srv.base_url, "--judge-model", "fake-judge", "--max-workers", "2"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while time.time() < deadline and (not ckpt.exists() or len(ckpt.read_text().splitlines()) < 8):
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not (path.parent / "judge" / "metrics.judged.summary.json").exists()
        done_before = {json.loads(line)["key"] for line in ckpt.read_text().splitlines() if line.endswith("}")}
        assert 8 <= len(done_before) < 27
        n_before = len(srv.requests)
        # the resumed run must use the same judge identity as the CLI run
        b = backend(srv, workers=2)
        b.client.model = "fake-judge"
        resumed = J.run_judge(path, b, progress=False)
        asked_again = len(srv.requests) - n_before
    assert asked_again == 27 - len(done_before)
    assert resumed == clean
    judged = json.loads((path.parent / "judge" / "metrics.judged.json").read_text())
    assert sum(1 for r in judged for h in r["post"]["hop_wise_pred"] for d in h if "judge" in d) == 18


def test_summarize_judged_hand_built():
    def it(result):
        return {"prompt": "p", "ref": ["r"], "pred": "x", "judge": {"result": result}}
    recs = [{"case_id": 1, "post": {"hop_wise_pred": [[it("PASS"), it("FAIL"), it("FAIL")], [it("ERROR")] * 3],
                                    "accuracy_pred": [it("FAIL"), it("ERROR"), it("PASS")]}},
            {"case_id": 2, "post": {"hop_wise_pred": [[it("PASS")] * 3, [it("PASS"), it("PASS"), it("FAIL")]],
                                    "accuracy_pred": [it("FAIL")] * 3}}]
    s = J.summarize_judged(recs)
    # case 1: only hop 0 is scored (1/3); case 2: (1 + 2/3)/2
    assert s["overall_hop_wise_average"] == pytest.approx((1 / 3 + 5 / 6) / 2)
    assert s["accuracy_averages"]["qa"] == pytest.approx((1 / 2 + 0) / 2)
    assert s["accuracy_averages"]["any_right_accuracy"] == pytest.approx(0.5)
    assert s["items"] == {"total": 18, "PASS": 7, "FAIL": 7, "ERROR": 4, "asserts_old": 0}
    assert s["cases_with_errors"] == 1


def test_offline_judging_keeps_other_judges_checkpoint_rows(tmp_path, monkeypatch):
    """The checkpoint holds every judge's verdicts; an offline (strict) run decides in memory and must not
    drop an LLM judge's rows from it."""
    monkeypatch.delenv("CODE_EDIT_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = write_run(tmp_path, fixture_records())
    ckpt = path.parent / "judge" / "metrics.judged.ckpt.jsonl"
    ckpt.parent.mkdir(parents=True)
    row = {"result": "PASS", "raw": "x", "method": "llm", "key": "k1", "judge_id": "llm:some-model"}
    ckpt.write_text(json.dumps(row) + "\n")
    from eval.__main__ import main
    assert main(["judge", "--input", str(path)]) == 0
    assert main(["analyze", "--input", str(path)]) == 0
    assert [json.loads(x) for x in ckpt.read_text().splitlines()] == [row]

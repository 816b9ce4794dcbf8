"""Causal-article generation against a fake OpenAI-compatible server on 127.0.0.1 (no network)."""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.chat import ChatClient, ChatError
from eval.mquake import MQuAKEFormatError, load_mquake
from scaffold.__main__ import main
from scaffold.articles import (ArticleConfig, ArticleRejected, entity_profile, extract_article,
                               generate_articles, parse_verdict, plan_rewrites)
from test_scaffold_wikidata import FakeWikidata, entity, item, snak

DATA = Path(__file__).resolve().parents[1] / "eval" / "data" / "MQuAKE-hard.json"
CASES = json.loads(DATA.read_text())[:2]      # case 7417 (Hey Jude -> Madonna ...) and the next one
Q = [rw["question"] for rw in CASES[0]["requested_rewrite"]]
FAST = dict(max_attempts=3, backoff_min=0.0, backoff_max=0.0)


def question_of(body: dict) -> str:
    return re.search(r"Question: (.*)", body["messages"][-1]["content"]).group(1).strip()


def article_for(q: str) -> str:
    return f"<h1>News about: {q}</h1>\n<p>The change happened in 2024.</p>"


class FakeChat:
    """Chat-completions server; generator model 'gen' writes, verifier model 'ver' judges.

    `verdicts[question]` and `drafts[question]` are queues (the last item repeats); by default the
    generator answers with tags and the verifier says PASS. A status int in a queue is sent as an error.
    """

    def __init__(self):
        self.verdicts: dict[str, list] = {}
        self.drafts: dict[str, list] = {}
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = fake.respond(body, self.headers.get("Authorization"))
                if isinstance(reply, int):
                    status, payload = reply, {"error": {"message": "scripted failure"}}
                else:
                    status, payload = 200, {"choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": reply}}]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def _next(queue: list | None, default):
        if not queue:
            return default
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def respond(self, body: dict, auth: str | None):
        q = question_of(body)
        with self.lock:
            self.calls.append({"model": body["model"], "question": q, "auth": auth, "body": body})
            if body["model"] == "gen":
                draft = self._next(self.drafts.get(q), "ok")
                if isinstance(draft, int):
                    return draft
                return (f"Scenario A ... Scenario B ...\nOutline: ...\n<article>{article_for(q)}</article>"
                        if draft == "ok" else draft)
            verdict = self._next(self.verdicts.get(q), "PASS")
            if isinstance(verdict, int):
                return verdict
            return f"The article is consistent.\n<verification>{verdict}</verification>"

    def count(self, model: str, question: str) -> int:
        return sum(1 for c in self.calls if c["model"] == model and c["question"] == question)


@pytest.fixture
def chat():
    f = FakeChat()
    yield f
    f.server.shutdown()
    f.server.server_close()


def clients(chat: FakeChat) -> tuple[ChatClient, ChatClient]:
    mk = lambda m: ChatClient(chat.url, m, max_retries=0, timeout=10)
    return mk("gen"), mk("ver")


def expected_record(case: dict, r: int, **extra) -> dict:
    rw = case["requested_rewrite"][r]
    return {"case_id": case["case_id"], "rewrite_idx": r, "question": rw["question"],
            "old_answer": rw["target_true"]["str"], "new_answer": rw["target_new"]["str"], **extra}


def test_entity_profile_whitelist_dates_and_truncation():
    record = {"id": "Q1744", "label": "Madonna", "description": "American singer (born 1958)",
              "properties": {"occupation": ["singer", "actress", "songwriter", "dancer"],
                             "date of birth": ["+1958-08-16T00:00:00Z", "1958-08-17"],
                             "date of death": ["+1999-00-00T00:00:00Z"],
                             "sex or gender": ["female"], "spouse": ["Sean Penn", "Guy Ritchie"],
                             "genre": ["pop music"], "award received": ["Grammy Award"]}}
    assert entity_profile(record) == (
        "Entity: Madonna\n"
        "Description: American singer (born 1958)\n"
        "- occupation: singer; actress; songwriter\n"
        "- date of birth: 1958-08-16; 1958-08-17\n"
        "- date of death: 1999\n"
        "- genre: pop music")


def test_plan_rewrites_uses_edit_triples_and_skips_missing_profiles():
    case = CASES[0]
    grounding = {q: {"id": q, "label": f"L{q}", "description": "", "properties": {}}
                 for t in case["orig"]["new_triples"] for q in (t[0], t[2])}
    del grounding["Q13955"]  # Arabic, the new object of rewrite 3
    tasks = plan_rewrites([case], grounding)
    assert [t.key for t in tasks] == ["7417_0", "7417_1", "7417_2", "7417_3"]
    assert [(t.question, t.old_answer, t.new_answer) for t in tasks] == [
        (rw["question"], rw["target_true"]["str"], rw["target_new"]["str"]) for rw in case["requested_rewrite"]]
    assert tasks[0].profiles == "Entity: LQ607742\nDescription: (no description)\n\nEntity: LQ1744\nDescription: (no description)"
    assert tasks[3].skip_reason == "no Wikidata profile for Q13955 (new object)" and tasks[3].profiles == ""
    assert all(t.profiles == "" and not t.skip_reason for t in plan_rewrites([case], None))
    broken = copy.deepcopy(case)
    broken["orig"]["edit_triples"] = broken["orig"]["edit_triples"][:2]
    with pytest.raises(ValueError, match="x.json: case_id 7417: orig.edit_triples"):
        plan_rewrites([broken], grounding, "x.json")


def test_extract_and_verdict_parsing():
    reply = "Plan: <article>draft</article>\n<think>maybe <article>no</article></think>\nFinal:\n<article>\n<h1>T</h1>\n</article>"
    assert extract_article(reply) == "<h1>T</h1>"
    with pytest.raises(ArticleRejected, match="no <article>"):
        extract_article("I wrote it but forgot the tags")
    assert parse_verdict("ok <verification>PASS</verification>") == (True, "ok")
    assert parse_verdict("old answer kept <verification> fail </verification>") == (False, "old answer kept")
    assert parse_verdict("PASS")[0] is False  # no tag: not a pass
    assert parse_verdict("<verification>PASS</verification> then <verification>FAIL</verification>")[0] is False


def test_fail_then_pass_never_passes_and_run_continues(chat, tmp_path):
    case = CASES[0]
    chat.verdicts[Q[0]] = ["FAIL", "PASS"]                  # attempt 1 fails, attempt 2 passes twice
    chat.verdicts[Q[1]] = ["PASS", "FAIL", "PASS"]          # second verification fails: retry
    chat.verdicts[Q[2]] = ["FAIL"]                          # never passes
    chat.drafts[Q[3]] = ["no tags here", "ok"]              # first draft unusable
    out = tmp_path / "articles.json"
    tasks = plan_rewrites([case], None)
    articles, failures = generate_articles(tasks, str(out), *clients(chat), ArticleConfig(**FAST), progress=False)

    assert [(chat.count("gen", q), chat.count("ver", q)) for q in Q] == [(2, 3), (2, 4), (3, 3), (2, 2)]
    expected = {f"7417_{r}": expected_record(case, r, article=article_for(Q[r])) for r in (0, 1, 3)}
    assert json.loads(out.read_text()) == expected == articles
    saved_failures = json.loads((tmp_path / "articles.failed.json").read_text())
    assert saved_failures == failures and list(failures) == ["7417_2"]
    fail = failures["7417_2"]
    assert fail["status"] == "failed" and fail["attempts"] == 3 and len(fail["reasons"]) == 3
    assert fail["reason"].startswith("verification 1/2 FAIL") and "article" not in fail
    # the verifier sees the extracted article, the generator the update and the profiles slot
    ver = next(c for c in chat.calls if c["model"] == "ver")
    assert ver["body"]["messages"][-1]["content"].endswith(article_for(ver["question"]))
    gen_user = next(c for c in chat.calls if c["model"] == "gen")["body"]["messages"][-1]["content"]
    rw = case["requested_rewrite"][0]
    assert f"Old answer (outdated, to be corrected): {rw['target_true']['str']}" in gen_user
    assert f"New answer (the new truth): {rw['target_new']['str']}" in gen_user
    assert "<article>" in next(c for c in chat.calls if c["model"] == "gen")["body"]["messages"][0]["content"]


class InterruptAfter:
    """Wraps a ChatClient; the call after `n` raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, client: ChatClient, n: int):
        self.client, self.n = client, n

    def complete(self, messages, **params):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.client.complete(messages, **params)


def test_resume_after_interruption(chat, tmp_path):
    out = tmp_path / "articles.json"
    tasks = plan_rewrites(CASES, None)
    gen, ver = clients(chat)
    with pytest.raises(KeyboardInterrupt):
        generate_articles(tasks, str(out), InterruptAfter(gen, 3), ver, ArticleConfig(**FAST), progress=False)
    first = json.loads(out.read_text())
    assert list(first) == [t.key for t in tasks[:3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["articles.failed.json", "articles.json"]  # no temp files

    # an article whose answers no longer match the input is stale and must be written again
    first[tasks[1].key]["new_answer"] = "something else"
    out.write_text(json.dumps(first))
    chat.calls.clear()
    articles, failures = generate_articles(tasks, str(out), gen, ver, ArticleConfig(**FAST), progress=False)
    done_again = [c["question"] for c in chat.calls if c["model"] == "gen"]
    assert done_again == [t.question for t in [tasks[1]] + tasks[3:]]
    assert failures == {} and json.loads(out.read_text()) == articles
    assert articles[tasks[1].key]["new_answer"] == tasks[1].new_answer and len(articles) == len(tasks)


def test_parallel_workers_match_sequential(chat, tmp_path):
    tasks = plan_rewrites(CASES, None)
    chat.verdicts[tasks[5].question] = ["FAIL", "PASS"]
    articles, failures = generate_articles(tasks, str(tmp_path / "a.json"), *clients(chat),
                                           ArticleConfig(**FAST, max_workers=3), progress=False)
    assert failures == {}
    assert articles == {t.key: {**t.record(), "article": article_for(t.question)} for t in tasks}


def test_fatal_auth_error_stops_the_run(chat, tmp_path):
    chat.drafts[Q[0]] = [401]
    tasks = plan_rewrites([CASES[0]], None)
    with pytest.raises(ChatError, match="HTTP 401"):
        generate_articles(tasks, str(tmp_path / "a.json"), *clients(chat), ArticleConfig(**FAST), progress=False)
    assert chat.count("gen", Q[0]) == 1 and len(chat.calls) == 1
    assert json.loads((tmp_path / "a.failed.json").read_text()) == {}


def test_transient_api_error_is_an_attempt(chat, tmp_path):
    chat.drafts[Q[0]] = [500, "ok"]
    articles, failures = generate_articles(plan_rewrites([CASES[0]], None), str(tmp_path / "a.json"),
                                           *clients(chat), ArticleConfig(**FAST), progress=False)
    assert failures == {} and chat.count("gen", Q[0]) == 2 and len(articles) == 4


def fake_wikidata_for(cases: list[dict]) -> FakeWikidata:
    wiki = FakeWikidata()
    wiki.db["P106"] = {"type": "property", "id": "P106", "labels": {"en": {"value": "occupation"}}}
    wiki.db["Q177220"] = entity("Q177220", "singer")
    for case in cases:
        o = case["orig"]
        for ids, labels in ((o["triples"], o["triples_labeled"]), (o["new_triples"], o["new_triples_labeled"])):
            for (s, _, ob), (ls, _, lo) in zip(ids, labels):
                claims = {"P106": [snak("P106", "wikibase-item", "wikibase-entityid", item("Q177220"))]}
                wiki.db[s] = entity(s, ls, f"description of {ls}", claims)
                wiki.db.setdefault(ob, entity(ob, lo))
    return wiki


def test_cli_end_to_end_merge_and_rerun(chat, tmp_path, monkeypatch, capsys):
    wiki = fake_wikidata_for(CASES)
    mquake = tmp_path / "in.json"
    mquake.write_text(json.dumps(CASES))
    monkeypatch.setenv("CODE_EDIT_API_KEYS", "sk-test-secret-123")
    monkeypatch.delenv("CODE_EDIT_CONTACT", raising=False)
    stuck = CASES[1]["requested_rewrite"][1]["question"]  # asked in no other rewrite
    chat.verdicts[stuck] = ["FAIL"]
    files = {"grounding_info_file": tmp_path / "grounding.json", "generated_articles_file": tmp_path / "gen.json",
             "merged_file": tmp_path / "merged_causalenhanced.json"}
    argv = ["--mquake_file", str(mquake), "--base_url", chat.url, "--generate_model_name", "gen",
            "--verify_model_name", "ver", "--wikidata_url", wiki.url, "--contact", "tests@example.org",
            "--max_attempts", "2", "--backoff_min", "0", "--backoff_max", "0", "--no_progress"]
    for k, v in files.items():
        argv += [f"--{k}", str(v)]
    try:
        assert main(argv) == 0
        err = capsys.readouterr().err
        stuck_key = f"{CASES[1]['case_id']}_1"
        assert "7/8 rewrites have an article" in err and stuck_key in err

        grounding = json.loads(files["grounding_info_file"].read_text())
        assert grounding["Q607742"]["label"] == "Hey Jude"
        gen_user = next(c for c in chat.calls if c["model"] == "gen" and c["question"] == Q[0])["body"]["messages"][-1]["content"]
        assert "Entity: Hey Jude\nDescription: description of Hey Jude\n- occupation: singer" in gen_user
        assert "Entity: Madonna" in gen_user
        assert all(c["auth"] == "Bearer sk-test-secret-123" for c in chat.calls)
        for p in tmp_path.iterdir():
            assert "sk-test-secret-123" not in p.read_text()

        merged = json.loads(files["merged_file"].read_text())
        assert len(merged) == len(CASES)
        for case, out in zip(CASES, merged):
            for r, rw in enumerate(out["requested_rewrite"]):
                key = f"{case['case_id']}_{r}"
                if key == stuck_key:
                    assert "article" not in rw
                else:
                    assert rw.pop("article") == article_for(rw["question"])
            assert out == case  # everything else copied unchanged
        with pytest.raises(MQuAKEFormatError, match=rf"case_id {CASES[1]['case_id']}: field 'requested_rewrite\[1\]\.article'"):
            load_mquake(files["merged_file"], require_articles=True)

        # rerun: cached entities, finished articles kept, only the failed rewrite is tried again
        chat.verdicts[stuck] = ["PASS"]
        chat.calls.clear()
        wiki.requests.clear()
        assert main(argv) == 0
        assert wiki.requests == [] and [c["question"] for c in chat.calls if c["model"] == "gen"] == [stuck]
        assert json.loads((tmp_path / "gen.failed.json").read_text()) == {}
        full = load_mquake(files["merged_file"], require_articles=True)
        assert [rw["article"] for c in full for rw in c["requested_rewrite"]] == [
            article_for(rw["question"]) for c in CASES for rw in c["requested_rewrite"]]
    finally:
        wiki.server.shutdown()
        wiki.server.server_close()


def test_cli_refuses_wikidata_without_contact(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CODE_EDIT_CONTACT", raising=False)
    mquake = tmp_path / "in.json"
    mquake.write_text(json.dumps(CASES[:1]))
    rc = main(["--mquake_file", str(mquake), "--grounding_info_file", str(tmp_path / "g.json"),
               "--generated_articles_file", str(tmp_path / "a.json"), "--merged_file", str(tmp_path / "m.json"),
               "--base_url", "http://127.0.0.1:9/v1", "--generate_model_name", "gen", "--no_progress"])
    assert rc == 2 and "CODE_EDIT_CONTACT" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "m.json").exists()


def test_cli_bad_input_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 5, "requested_rewrite": []}]))
    rc = main(["--mquake_file", str(bad), "--no_wikidata", "--generated_articles_file", str(tmp_path / "a.json"),
               "--merged_file", str(tmp_path / "m.json"), "--base_url", "http://127.0.0.1:9/v1",
               "--generate_model_name", "gen", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.json" in err and "case_id 5" in err


def test_bundled_reference_format_articles_count_as_done(chat, tmp_path):
    dev = json.loads((DATA.parent / "MQuAKE-hard_articles_dev.json").read_text())
    out = tmp_path / "articles.json"
    out.write_text(json.dumps(dev))
    ids = {v["case_id"] for v in dev.values()}
    cases = [c for c in json.loads(DATA.read_text()) if c["case_id"] in ids]
    articles, failures = generate_articles(plan_rewrites(cases, None), str(out), *clients(chat),
                                           ArticleConfig(**FAST), progress=False)
    assert chat.calls == [] and failures == {} and articles == dev  # nothing regenerated

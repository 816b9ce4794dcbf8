"""Issue R1's failures on the evaluation side: `eval serve` refuses what it cannot serve (context, limits,
bad sampling values, a full queue) and lets short requests past a long one; secrets in a base URL are never
written or printed; an HTTP call has a total deadline; a judge whose every item failed, or that is
interrupted, says so in its exit code."""
import json
import threading
import time

import pytest
import requests

from eval.chat import ChatClient, ChatError, redact_url
from eval.serve import make_server
from eval_fakes import FakeOpenAI, Reply, chat_reply
from model import load_model, load_tokenizer
from test_eval_judge import fixture_records, write_run
from test_eval_serve import Running

MSGS = [{"role": "user", "content": "Name a city in France."}]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu"), load_tokenizer("tiny-random")


def post(srv, body, **kw):
    return requests.post(srv.base_url + "/chat/completions", timeout=60, **({"json": body} if body is not None else {}),
                         **kw)


@pytest.mark.parametrize("extra, needle", [
    ({"max_tokens": 10**9}, "'max_tokens' must be in [1, 64]"),
    ({"max_tokens": -5}, "'max_tokens' must be in"),
    ({"max_tokens": 2.5}, "'max_tokens' must be an integer"),
    ({"temperature": -1}, "'temperature' must be in [0, 2]"),
    ({"temperature": float("nan")}, "'temperature'"),
    ({"top_p": 5}, "'top_p' must be in"),
    ({"seed": "abc"}, "'seed' must be an integer"),
    ({"n": "2"}, "'n' must be an integer"),
    ({"stop": [1, 2]}, "'stop' must be"),
])
def test_bad_sampling_values_are_400(tiny, extra, needle):
    model, tok = tiny
    with Running(make_server(model, tok, model_name="t", max_new_tokens=4, max_tokens_cap=64)) as srv:
        data = json.dumps({"messages": MSGS, **extra}, allow_nan=True)  # NaN as the JS literal a client may send
        r = requests.post(srv.base_url + "/chat/completions", data=data, timeout=60,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_context_and_body_limits(tiny):
    model, tok = tiny
    context = model.config.max_position_embeddings
    long_text = "word " * (context + 100)
    with Running(make_server(model, tok, model_name="t", max_new_tokens=4, max_body_bytes=len(long_text) * 2)) as srv:
        r = post(srv, {"messages": [{"role": "user", "content": long_text}]})
        assert r.status_code == 400 and f"the model's context is {context}" in r.json()["error"]["message"]
        n = len(tok.encode(tok.chat(MSGS, add_generation_prompt=True)))
        r = post(srv, {"messages": MSGS, "max_tokens": context - n + 1})
        assert r.status_code == 400 and f"{context + 1} tokens exceed the model's context" in r.json()["error"]["message"]
        assert post(srv, {"messages": MSGS, "max_tokens": 2}).status_code == 200
        r = post(srv, None, data=b"x" * (len(long_text) * 2 + 1), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_a_full_queue_answers_503(tiny, monkeypatch):
    import model as model_pkg
    from model import generate
    model, tok = tiny
    gate = threading.Event()

    def slow(*a, **k):
        gate.wait(10)
        return generate(*a, **k)
    monkeypatch.setattr(model_pkg, "generate", slow)
    with Running(make_server(model, tok, model_name="t", max_new_tokens=2, max_queue=1)) as srv:
        first = threading.Thread(target=post, args=(srv, {"messages": MSGS}))
        first.start()
        time.sleep(0.3)
        r = post(srv, {"messages": MSGS})
        gate.set()
        first.join(timeout=30)
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
        # the slot is free again; the server frees it just after the first reply is written, so a request
        # sent the instant that reply arrives may still find it taken: allow a few seconds, no more
        deadline, codes = time.monotonic() + 5, []
        while not codes or (codes[-1] == 503 and time.monotonic() < deadline):
            codes.append(post(srv, {"messages": MSGS}).status_code)
            time.sleep(0.05 if codes[-1] == 503 else 0)
        assert codes[-1] == 200, codes


def test_short_requests_pass_a_long_one(tiny, monkeypatch):
    """With slices of 4 tokens, requests of 2 tokens sent while a 48-token one runs finish before it, and
    the long one's text equals a single uninterrupted greedy generation."""
    import model as model_pkg
    from model import generate
    model, tok = tiny
    calls = []

    def counting(m, ps, **k):
        calls.append(k["max_new_tokens"])
        time.sleep(0.05)
        return generate(m, ps, **k)
    ids = tok.encode(tok.chat(MSGS, add_generation_prompt=True))
    (ref,) = generate(model, [ids], max_new_tokens=48, temperature=0.0, stop_ids=list(tok.eos_ids))
    monkeypatch.setattr(model_pkg, "generate", counting)
    done = []
    with Running(make_server(model, tok, model_name="t", max_new_tokens=48, slice_tokens=4)) as srv:
        def ask(name, n):
            r = post(srv, {"messages": MSGS, "max_tokens": n})
            done.append((name, r.json()["choices"][0]["message"]["content"]))
        long_req = threading.Thread(target=ask, args=("long", 48))
        long_req.start()
        time.sleep(0.2)
        shorts = [threading.Thread(target=ask, args=(f"short{i}", 2)) for i in range(3)]
        for t in shorts:
            t.start()
        for t in shorts + [long_req]:
            t.join(timeout=60)
    order = [name for name, _ in done]
    assert order.index("long") == len(order) - 1 and len(order) == 4
    assert max(calls) <= 4 and len(calls) >= len(ref.tokens) // 4  # generated in slices of 4
    assert dict(done)["long"] == tok.decode(ref.tokens, skip_special_tokens=True)


def test_redact_url():
    assert redact_url("http://user:sk-SECRET@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url("https://h/v1?key=sk-SECRET&x=1") == "https://h/v1?key=***&x=1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_key_in_the_base_url_is_never_written(tmp_path, capsys, caplog, monkeypatch):
    import eval.chat
    secret = "sk-VERYSECRET123"
    path = write_run(tmp_path, fixture_records())
    from eval.__main__ import main
    monkeypatch.setattr(eval.chat.time, "sleep", lambda s: None)  # one retry each, without the backoff's wait
    caplog.set_level("WARNING", logger="eval.chat")
    with FakeOpenAI(lambda req: Reply(500, {"error": {"message": "boom"}})) as srv:
        url = srv.base_url.replace("http://", f"http://user:{secret}@")
        rc = main(["judge", "--input", str(path), "--base-url", url, "--judge-model", "m", "--max-retries", "1",
                   "--timeout", "5"])
    assert rc == 2  # every item failed
    out = capsys.readouterr()
    written = "".join(p.read_text() for p in path.parent.rglob("*") if p.is_file())
    assert "retry 1/1" in caplog.text and "***@127.0.0.1" in caplog.text  # the retry line was logged, redacted
    for text in (out.out, out.err, written, caplog.text):
        assert secret not in text
    summary = json.loads((path.parent / "judge" / "metrics.judged.summary.json").read_text())
    assert summary["base_url"].startswith("http://***@127.0.0.1")
    assert "every one of the 27 items failed" in out.err


def test_the_deadline_is_total_not_per_read():
    body = json.dumps({"choices": [{"message": {"content": "x" * 100}, "finish_reason": "stop"}]})
    with FakeOpenAI(lambda req: Reply(200, body, drip=0.05)) as srv:  # ~6 s for the whole body
        client = ChatClient(srv.base_url, "m", timeout=1.0, max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(ChatError, match="timed out"):
            client.complete(MSGS)
        assert time.monotonic() - t0 < 2.5


def test_an_interrupted_judge_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import eval.judge as J
    path = write_run(tmp_path, fixture_records())

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(J, "run_judge", interrupted)
    from eval.__main__ import main
    assert main(["judge", "--input", str(path)]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_a_judge_that_worked_exits_0(tmp_path):
    path = write_run(tmp_path, fixture_records())
    from eval.__main__ import main
    with FakeOpenAI(lambda req: chat_reply("<verification>PASS</verification>")) as srv:
        assert main(["judge", "--input", str(path), "--base-url", srv.base_url, "--judge-model", "m"]) == 0


def test_default_max_new_tokens_obeys_the_cap(tiny):
    """A request that sets no max_tokens gets max_new_tokens: above max_tokens_cap it would slip past the cap."""
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens 40 is above max_tokens_cap 4"):
        make_server(model, tok, model_name="t", max_new_tokens=40, max_tokens_cap=4)
    from eval.__main__ import main
    assert main(["serve", "--model", "x", "--max-new-tokens", "40", "--max-tokens-cap", "4"]) == 2

"""eval.chat against a scripted fake OpenAI-compatible server on 127.0.0.1: retries, Retry-After,
timeouts, no-retry statuses, content filter, key rotation, key hygiene and the bounded pool."""
import logging
import socket
import threading
import time

import pytest

from eval.chat import ChatClient, ChatError, ContentFilterError, resolve_api_keys
from eval_fakes import FakeOpenAI, Reply, chat_reply, script

MSG = [{"role": "user", "content": "hi"}]
SECRET = "sk-test-SECRET-0123456789"


def client(srv, **kw):
    kw.setdefault("backoff", 0.001)
    kw.setdefault("max_backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return ChatClient(srv.base_url, "judge-m", **kw)


def test_resolve_api_keys_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("CODE_EDIT_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_keys() == []
    monkeypatch.setenv("OPENAI_API_KEY", "k-openai")
    assert resolve_api_keys() == ["k-openai"]
    monkeypatch.setenv("CODE_EDIT_API_KEYS", " k1, k2 ,,k3 ")
    assert resolve_api_keys() == ["k1", "k2", "k3"]
    f = tmp_path / "keys.txt"
    f.write_text("# my keys\nf1\n\n  f2  # second\n")
    assert resolve_api_keys(str(f)) == ["f1", "f2"]
    assert resolve_api_keys(str(f), explicit="e1") == ["e1"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ChatError, match="empty.txt"):
        resolve_api_keys(str(empty))
    with pytest.raises(ChatError, match="missing.txt"):
        resolve_api_keys(str(tmp_path / "missing.txt"))


def test_success_body_path_and_no_auth_without_key():
    with FakeOpenAI(script(chat_reply("hello"))) as srv:
        out = client(srv).complete(MSG, temperature=0.0, max_tokens=5)
    assert out == "hello"
    (req,) = srv.requests
    assert req.path == "/v1/chat/completions"
    assert req.body == {"model": "judge-m", "messages": MSG, "stream": False, "temperature": 0.0, "max_tokens": 5}
    assert req.auth is None


def test_keys_round_robin():
    with FakeOpenAI(script(chat_reply("ok"))) as srv:
        c = client(srv, api_keys=["a", "b", "c"])
        for _ in range(7):
            c.complete(MSG)
    assert [r.auth for r in srv.requests] == ["Bearer a", "Bearer b", "Bearer c"] * 2 + ["Bearer a"]


def test_429_honours_retry_after():
    with FakeOpenAI(script(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.4"}),
                           chat_reply("done"))) as srv:
        t0 = time.monotonic()
        assert client(srv).complete(MSG) == "done"
        elapsed = time.monotonic() - t0
    assert len(srv.requests) == 2
    assert elapsed >= 0.4  # backoff alone would be ~1 ms


def test_5xx_retried_then_success_and_bounded_failure():
    with FakeOpenAI(script(Reply(500, "boom"), Reply(502, "bad gw"), Reply(503, ""), chat_reply("ok"))) as srv:
        assert client(srv, max_retries=5).complete(MSG) == "ok"
    assert len(srv.requests) == 4
    with FakeOpenAI(script(Reply(500, {"error": {"message": "down"}}))) as srv:
        with pytest.raises(ChatError) as ei:
            client(srv, max_retries=2).complete(MSG)
    assert len(srv.requests) == 3
    assert ei.value.status == 500 and ei.value.retryable
    assert "gave up after 3 attempts" in str(ei.value)


def test_stalled_response_times_out_and_retries_bounded():
    with FakeOpenAI(script(Reply(stall=1.0, body="{}"))) as srv:
        t0 = time.monotonic()
        with pytest.raises(ChatError, match="timed out") as ei:
            client(srv, timeout=0.2, max_retries=1).complete(MSG)
        elapsed = time.monotonic() - t0
    assert ei.value.status is None and ei.value.retryable
    assert len(srv.requests) == 2
    assert elapsed < 0.9  # two 0.2 s timeouts, not the 1 s stall


def test_stall_then_recovery():
    with FakeOpenAI(script(Reply(stall=0.6, body="{}"), chat_reply("late but fine"))) as srv:
        assert client(srv, timeout=0.2).complete(MSG) == "late but fine"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_not_retried_and_key_not_leaked(status, caplog):
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}. Also sk-ab12***yz."}}
    with FakeOpenAI(script(Reply(status, echo))) as srv, caplog.at_level(logging.DEBUG):
        c = client(srv, api_keys=[SECRET, "other-key"])
        with pytest.raises(ChatError) as ei:
            c.complete(MSG)
    assert len(srv.requests) == 1
    assert srv.requests[0].auth == f"Bearer {SECRET}"
    err = ei.value
    assert err.status == status and not err.retryable
    assert f"HTTP {status}" in str(err) and srv.base_url in str(err)
    assert "key #1 of 2" in str(err)
    assert SECRET not in str(err) and "sk-ab12" not in str(err)
    assert SECRET not in caplog.text


def test_keys_not_in_repr_or_retry_logs(caplog):
    with FakeOpenAI(script(Reply(500, {"error": {"message": f"bad {SECRET}"}}), chat_reply("ok"))) as srv:
        c = client(srv, api_keys=[SECRET])
        with caplog.at_level(logging.DEBUG):
            assert c.complete(MSG) == "ok"
    assert "retry 1/6" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in repr(c) and SECRET not in str(c)
    assert "judge-m" in repr(c)


def test_malformed_body_retried_then_error():
    with FakeOpenAI(script(Reply(200, "this is not json"), Reply(200, {"choices": []}), chat_reply("ok"))) as srv:
        assert client(srv).complete(MSG) == "ok"
    assert len(srv.requests) == 3
    with FakeOpenAI(script(Reply(200, "<html>proxy error</html>"))) as srv:
        with pytest.raises(ChatError, match="malformed") as ei:
            client(srv, max_retries=2).complete(MSG)
    assert len(srv.requests) == 3 and ei.value.status == 200


def test_content_filter_is_distinguishable_and_not_retried():
    with FakeOpenAI(script(chat_reply(None, finish_reason="content_filter"))) as srv:
        with pytest.raises(ContentFilterError):
            client(srv).complete(MSG)
    assert len(srv.requests) == 1
    body = {"error": {"code": "content_filter", "message": "The response was filtered"}}
    with FakeOpenAI(script(Reply(400, body))) as srv:
        with pytest.raises(ContentFilterError) as ei:
            client(srv).complete(MSG)
    assert ei.value.status == 400 and isinstance(ei.value, ChatError)
    assert len(srv.requests) == 1


def test_connection_refused_is_retryable_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", backoff=0.001, max_backoff=0.01, max_retries=2, timeout=2)
    with pytest.raises(ChatError, match="cannot connect") as ei:
        c.complete(MSG)
    assert ei.value.retryable and ei.value.status is None


def test_map_bounded_pool_yields_everything_once():
    active = 0
    peak = 0
    lock = threading.Lock()

    def work(i):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.01)
        with lock:
            active -= 1
        if i % 5 == 0:
            raise ValueError(f"item {i}")
        return i * i

    with FakeOpenAI(script(chat_reply("x"))) as srv:
        c = client(srv)
        out = list(c.map(work, range(40), max_workers=3))
    assert sorted(i for i, _ in out) == list(range(40))
    for i, r in out:
        if i % 5 == 0:
            assert isinstance(r, ValueError) and str(r) == f"item {i}"
        else:
            assert r == i * i
    assert 1 < peak <= 3

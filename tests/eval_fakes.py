"""Test helper: a scripted OpenAI-compatible chat server on 127.0.0.1 (port 0, daemon thread).
Each test passes a responder that maps a request to a reply; every request is recorded."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it is not JSON

    @property
    def auth(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.body["messages"] if m["role"] == "user")


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0  # seconds to wait before answering (longer than the client timeout = a stall)
    drip: float = 0.0   # seconds between the body's bytes (a server that answers a byte at a time)


def chat_reply(content: str | None, finish_reason: str = "stop") -> Reply:
    return Reply(200, {"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "finish_reason": finish_reason,
                                    "message": {"role": "assistant", "content": content}}]})


def script(*replies: Reply | Callable[[Request], Reply]) -> Callable[[Request], Reply]:
    """Answer requests with the given replies in order; the last one repeats."""
    queue = list(replies)
    lock = threading.Lock()

    def respond(req: Request) -> Reply:
        with lock:
            r = queue.pop(0) if len(queue) > 1 else queue[0]
        return r(req) if callable(r) else r
    return respond


class FakeOpenAI:
    """`with FakeOpenAI(responder) as srv:` -> srv.base_url, srv.requests."""

    def __init__(self, responder: Callable[[Request], Reply]):
        self.responder = responder
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n).decode("utf-8")
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with outer._lock:
                    outer.requests.append(req)
                reply = outer.responder(req)
                if reply.stall:
                    time.sleep(reply.stall)
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data_b = data.encode("utf-8")
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data_b)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if reply.drip:
                        for i in range(len(data_b)):
                            self.wfile.write(data_b[i:i + 1])
                            self.wfile.flush()
                            time.sleep(reply.drip)
                    else:
                        self.wfile.write(data_b)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

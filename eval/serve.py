"""`python -m eval serve`: an OpenAI-compatible chat-completions server (stdlib ThreadingHTTPServer)
over this project's decoder and sampler, so the judge can be a local model with no paid API.
Greedy requests that wait together share one generate call; vLLM's `guided_choice` field is honoured
(greedy, constrained to the listed strings); the server binds 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class _BadRequest(ValueError):
    pass


@dataclass
class _Job:
    ids: list[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)  # written so far
    logprobs: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class _GreedyBatcher:
    """One generate call for every greedy request waiting when the model frees up. A judge sends many
    requests at once (--max-workers); one by one a small model idles the GPU between launches. Greedy
    tokens of a prompt do not depend on its batch neighbours (model.generate's contract, tested there;
    on a GPU, bf16 kernels chosen by batch size may still break a near-tie differently).
    A call writes at most `slice_tokens` per request: a request that wants more goes back to the end of
    the queue with what it wrote appended to its prompt (greedy decoding continues exactly), so one
    long request delays the short ones behind it by one slice, not by its whole length."""

    def __init__(self, model: Any, model_lock: threading.Lock, stop_ids: list[int], max_batch: int = 64,
                 slice_tokens: int = 256):
        self.model, self.model_lock, self.stop_ids, self.max_batch = model, model_lock, stop_ids, max_batch
        self.slice_tokens = slice_tokens
        self.pending: list[_Job] = []
        self.pending_lock = threading.Lock()

    def __call__(self, ids: list[int], max_tokens: int) -> Any:
        job = _Job(ids, max_tokens)
        with self.pending_lock:
            self.pending.append(job)
        while not job.done.is_set():
            with self.model_lock:
                if not job.done.is_set():
                    self._round()
        if job.error is not None:
            raise job.error
        return job.result

    def _round(self) -> None:
        """One generate call over the queue's head; finished jobs are answered, the rest requeued."""
        from model import Completion, generate

        with self.pending_lock:
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        if not batch:
            return
        try:
            want = [min(j.max_tokens - len(j.tokens), self.slice_tokens) for j in batch]
            comps = generate(self.model, [j.ids + j.tokens for j in batch], temperature=0.0, stop_ids=self.stop_ids,
                             max_new_tokens=max(want))
            again = []
            for j, n, c in zip(batch, want, comps):  # each to its own limit: greedy prefixes are the same
                stopped = c.finish_reason == "stop" and len(c.tokens) <= n
                j.tokens += c.tokens[:n]
                j.logprobs += c.logprobs[:n]
                if stopped or len(j.tokens) >= j.max_tokens:
                    j.result = Completion(prompt_index=0, sample_index=0, tokens=j.tokens, logprobs=j.logprobs,
                                          finish_reason="stop" if stopped else "length")
                    j.done.set()
                else:
                    again.append(j)
            with self.pending_lock:
                self.pending += again
        except BaseException as e:  # every request of the call gets the error, not a hang
            for j in batch:
                j.error = e
                j.done.set()


@dataclass
class PrefixKV:
    """The keys and values of the last sequence a guided race fed. A judge's requests share long fixed
    instructions (767 of ~800 tokens for a self-refutation verdict), so the next race prefills only the
    tokens after the longest common prefix."""
    tokens: list[int] = field(default_factory=list)
    cache: Any = None


def guided_choice(model: Any, prompt: list[int], choices: list[list[int]], end_id: int,
                  kv: PrefixKV | None = None) -> int:
    """The index of the choice that greedy decoding writes when it may write only one of `choices`
    (token ids, each followed by `end_id`), as vLLM's guided_choice does at temperature 0: wherever the
    choices still in the race differ, the allowed token with the highest logit wins. The tokens written
    since the last branch point are fed as one chunk into a KV cache at the next, so a race costs about
    one prompt forward; with `kv` (kept by the caller, one race at a time) only the part of the prompt
    that differs from the previous race's."""
    import torch

    from model.decoder import KVCache

    seqs = [c + [end_id] for c in choices]
    alive, out = list(range(len(seqs))), []
    w = model.lm_head.weight
    kv = kv if kv is not None else PrefixKV()
    need = len(prompt) + max(map(len, seqs))
    c = kv.cache
    if c is None or c.length < need or c.k[0].dtype != w.dtype or c.k[0].device != w.device:
        kv.cache, kv.tokens = KVCache.empty(model.config, 1, max(need, 2048), w.dtype, w.device), []
    common = next((i for i, (x, y) in enumerate(zip(kv.tokens, prompt)) if x != y), min(len(kv.tokens), len(prompt)))
    fed = min(common, len(prompt) - 1)  # slots [0, fed) hold this prompt's keys; the last token gives logits
    kv.tokens = kv.tokens[:fed]
    while len(alive) > 1:
        allowed = sorted({seqs[i][len(out)] for i in alive})
        if len(allowed) > 1:
            seq = prompt + out
            S = len(seq)
            mask = torch.ones(S - fed, S, dtype=torch.bool, device=w.device).tril(diagonal=fed)[None, None]
            idx = torch.arange(fed, S, device=w.device)
            with torch.inference_mode():
                h = model.run(torch.tensor([seq[fed:]], device=w.device), idx[None], mask, kv.cache, idx)[0, -1]
                logits = model.logits(h[None])[0]
            fed, kv.tokens = S, seq
            tok = allowed[int(logits[allowed].argmax())]
        else:
            tok = allowed[0]
        alive = [i for i in alive if seqs[i][len(out)] == tok]
        out.append(tok)
    return alive[0]


def _number(body: dict, key: str, default: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    """body[key] (or `default`) checked: a number (an integer if asked), finite, in [lo, hi]."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not (lo <= v <= hi):  # also refuses NaN
        raise _BadRequest(f"'{key}' must be in [{lo:g}, {hi:g}], got {v!r}")
    return v


@dataclass
class _Request:
    """A checked chat request: prompt ids and how to decode them."""
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    choices: list[str] | None


@dataclass
class Limits:
    """What a request may ask (make_server's arguments; `python -m eval serve` flags)."""
    max_new_tokens: int = 1024  # max_tokens of a request that sets none (less if the context would overflow)
    temperature: float = 0.0  # of a request that sets none: greedy, a judge should be deterministic
    max_tokens_cap: int = 4096
    max_body_bytes: int = 4 * 1024 * 1024
    max_queue: int = 256
    slice_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_new_tokens > self.max_tokens_cap:  # the default must obey the cap a request is held to
            raise ValueError(f"max_new_tokens {self.max_new_tokens} is above max_tokens_cap {self.max_tokens_cap}")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRequest(f"messages[{i}] must be {{'role': str, 'content': str}}")
    return messages


def _choices(body: dict, temperature: float) -> list[str] | None:
    choices = body.get("guided_choice")
    if choices is None:
        return None
    if (not isinstance(choices, list) or not choices or len(choices) > 64
            or not all(isinstance(c, str) and c for c in choices) or len(set(choices)) < len(choices)):
        raise _BadRequest("'guided_choice' must be a list of 1 to 64 distinct non-empty strings")
    if temperature != 0.0:
        raise _BadRequest("'guided_choice' is supported at temperature 0 only")
    return choices


def parse_request(body: dict, tokenizer: Any, context: int, limits: Limits) -> _Request:
    """A chat request checked field by field (400 on anything bad), its prompt tokenised and its length
    checked against the model's context."""
    # 1) the fields
    messages = _messages(body)
    if body.get("stream"):
        raise _BadRequest("stream=true is not supported")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise _BadRequest("only n=1 is supported")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise _BadRequest("'stop' must be a string or a list of strings")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _number(body, key, None, 1, limits.max_tokens_cap, integer=True)
    temp = float(_number(body, "temperature", limits.temperature, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 1e-9, 1.0))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest(f"'seed' must be an integer, got {seed!r}")
    choices = _choices(body, temp)
    # 2) the prompt against the context
    ids = tokenizer.encode(tokenizer.chat(messages, add_generation_prompt=True))
    room = context - len(ids) if context else limits.max_tokens_cap
    if room < 1:
        raise _BadRequest(f"the prompt has {len(ids)} tokens; the model's context is {context}")
    if asked is not None and asked > room:
        raise _BadRequest(f"the prompt has {len(ids)} tokens and {key} is {asked}: {len(ids) + asked} tokens "
                          f"exceed the model's context of {context}")
    max_tokens = asked if asked is not None else min(limits.max_new_tokens, room)
    return _Request(ids, int(max_tokens), temp, top_p, seed, stop, choices)


class _Service:
    """The model behind the server: one lock for the model, the greedy batcher, the guided-choice prefix
    cache (races run one at a time, under the lock, each after the previous one's prompt)."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str, limits: Limits):
        self.model, self.tokenizer, self.model_name, self.limits = model, tokenizer, model_name, limits
        self.lock = threading.Lock()
        self.greedy = _GreedyBatcher(model, self.lock, list(tokenizer.eos_ids), slice_tokens=limits.slice_tokens)
        self.prefix = PrefixKV()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.slots = threading.BoundedSemaphore(limits.max_queue)

    def complete(self, body: dict) -> dict:
        from model import generate  # lazy: importing eval must not need the model stack

        tok = self.tokenizer
        req = parse_request(body, tok, self.context, self.limits)
        if req.choices is not None:
            encoded = [tok.encode(c) for c in req.choices]
            if len({tuple(e) for e in encoded}) < len(encoded):
                raise _BadRequest("two 'guided_choice' strings encode to the same tokens")
            with self.lock:
                k = guided_choice(self.model, req.ids, encoded, tok.eos_ids[0] if tok.eos_ids else 0, self.prefix)
            return self.response(req.choices[k], "stop", len(req.ids), len(encoded[k]))
        if req.temperature == 0.0:
            c = self.greedy(req.ids, req.max_tokens)
        else:
            with self.lock:
                (c,) = generate(self.model, [req.ids], max_new_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, num_samples=1, stop_ids=list(tok.eos_ids), seed=req.seed)
        text, finish = tok.decode(c.tokens, skip_special_tokens=True), c.finish_reason
        cut = [text.find(s) for s in req.stop if s and s in text]
        if cut:
            text, finish = text[:min(cut)], "stop"
        return self.response(text, finish, len(req.ids), len(c.tokens))

    def response(self, text: str, finish: str, n_in: int, n_out: int) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    service: _Service  # set on the subclass make_server builds

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model",
                                                          "owned_by": "local"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        # 1) the body, within its size limit (a larger one is not read)
        limits = self.service.limits
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= limits.max_body_bytes:
            self.close_connection = True
            return self._error(413, f"the request body must have a Content-Length of at most {limits.max_body_bytes} "
                                    f"bytes, got {self.headers.get('Content-Length')}", "invalid_request_error")
        raw = self.rfile.read(n)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}; use /v1/chat/completions", "not_found")
        # 2) a slot in the bounded queue
        if not self.service.slots.acquire(blocking=False):
            return self._error(503, f"the server is busy ({limits.max_queue} requests waiting or running); retry "
                                    "later", "server_busy")
        # 3) the completion
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            self._send(200, self.service.complete(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._error(400, "the request body is not valid JSON", "invalid_request_error")
        except (_BadRequest, TypeError, ValueError) as e:
            self._error(400, str(e), "invalid_request_error")
        except Exception as e:  # the model failed: say so, keep serving
            log.exception("generation failed")
            self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
        finally:
            self.service.slots.release()


def make_server(model: Any, tokenizer: Any, *, model_name: str, host: str = "127.0.0.1", port: int = 0,
                **limits: Any) -> ThreadingHTTPServer:
    """A ready-to-run server (call serve_forever); `limits` are Limits' fields. Only n=1 and stream=false
    are supported. Refused with 400: a bad sampling value, max_tokens above max_tokens_cap, a prompt that
    with its max_tokens exceeds the model's context; with 413 a body over max_body_bytes; with 503 a request
    when max_queue are already waiting or running. Greedy requests are served in slices of slice_tokens."""
    service = _Service(model, tokenizer, model_name, Limits(**limits))
    handler = type("Handler", (_Handler,), {"service": service})
    return _Server((host, port), handler)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 refuses connections when a judge opens 32 at once


def serve(source: str, *, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int = 1024,
          device: str | None = None, dtype: str | None = None, **limits: int) -> None:
    """Load `source` with model.load_model / load_tokenizer and serve it until interrupted."""
    import torch

    from model import load_model, load_tokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    model = load_model(source, dtype=torch_dtype, device=device)
    tokenizer = load_tokenizer(source)
    server = make_server(model, tokenizer, model_name=str(source), host=host, port=port,
                         max_new_tokens=max_new_tokens, **limits)
    h, p = server.server_address[:2]
    print(f"serving {source} at http://{h}:{p}/v1  (judge with: --base-url http://{h}:{p}/v1 --judge-model {source})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""The project's one OpenAI-compatible chat-completions client (over `requests`), used by the
judge, the analysis and `scaffold`. Keys rotate round-robin, transient failures are retried with
capped exponential backoff and jitter, and API keys never appear in logs, reprs, errors or files."""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import itertools
import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import requests
import urllib3

log = logging.getLogger(__name__)

KEYS_ENV = "CODE_EDIT_API_KEYS"
OPENAI_KEY_ENV = "OPENAI_API_KEY"

# Mistakes in the URL or headers: retrying cannot help.
_CONFIG_ERRORS = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                  requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader)
# Statuses worth another try: rate limits, request timeouts, conflicts and every 5xx.
_RETRY_STATUSES = {408, 409, 425, 429}
# Provider error texts sometimes echo part of the key ("Incorrect API key provided: sk-ab***yz").
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}|\bBearer\s+\S+", re.IGNORECASE)


class ChatError(RuntimeError):
    """A chat request that failed for good. `status` is the HTTP status (None for network errors,
    timeouts and malformed bodies); `retryable` says whether the cause was transient."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ContentFilterError(ChatError):
    """The provider refused or cut the answer with a content filter (finish_reason or error code
    `content_filter`). Callers that can judge without the model (the strict grader's fallback) catch this."""


def resolve_api_keys(api_key_file: str | None = None, explicit: str | None = None) -> list[str]:
    """API keys by precedence: `explicit` (a flag value; commas separate a pool) > `api_key_file`
    (one key per line, `#` comments) > $CODE_EDIT_API_KEYS (comma-separated) > $OPENAI_API_KEY.
    Returns [] when none is set: local servers need no key."""
    if explicit:
        return _split(explicit.split(","))
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0] for line in f]
        except OSError as e:
            raise ChatError(f"cannot read API key file {api_key_file}: {e.strerror}") from None
        keys = _split(lines)
        if not keys:
            raise ChatError(f"API key file {api_key_file} holds no key (one key per line, '#' comments)")
        return keys
    pool = os.environ.get(KEYS_ENV, "")
    if pool.strip():
        return _split(pool.split(","))
    single = os.environ.get(OPENAI_KEY_ENV, "").strip()
    return [single] if single else []


def _split(parts: Iterable[str]) -> list[str]:
    return [p.strip() for p in parts if p.strip()]


@dataclass
class ChatClient:
    """`complete()` posts one chat request to `{base_url}/chat/completions` and returns the text.
    `max_retries` counts retries after the first attempt (so at most max_retries + 1 requests);
    `timeout` is per request (connect and read). `max_retry_after` caps a server's Retry-After."""

    base_url: str
    model: str
    api_keys: list[str] = field(default_factory=list, repr=False)
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _next_key: Iterator[int] = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("ChatClient needs a base_url (e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)")
        self.api_keys = [k for k in (s.strip() for s in self.api_keys) if k]
        self._next_key = itertools.cycle(range(len(self.api_keys))) if self.api_keys else None  # type: ignore[assignment]

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def shown(self) -> str:
        """The base URL as it may be printed or recorded: without user-info or key-like query values."""
        return redact_url(self.base_url)

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    def _post(self, body: dict, headers: dict) -> requests.Response:
        """POST with a deadline checked between reads: the request ends within about 2 x `timeout` (the
        deadline of `timeout`, plus at most one read that blocks up to `timeout`). requests' own timeout
        applies per read, so without it a server that drips a byte at a time could hold a request for ever;
        the body is read here."""
        start = time.monotonic()
        resp = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True)
        chunks = []
        read = getattr(resp.raw, "read1", None)  # urllib3 2: what has arrived, without waiting for more
        try:
            while True:
                if time.monotonic() - start > self.timeout:
                    raise requests.Timeout("total deadline")
                chunk = read(65536, decode_content=True) if read else resp.raw.read(1, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as e:
            raise requests.Timeout(str(e)) if isinstance(e, urllib3.exceptions.ReadTimeoutError) \
                else requests.ConnectionError(str(e)) from None
        finally:
            resp.close()
        resp._content = b"".join(chunks)  # resp.text / resp.json() read it as usual
        return resp

    def complete(self, messages: list[dict], **params: Any) -> str:
        """Send `messages` (plus extra body fields such as temperature) and return
        choices[0].message.content. Raises ChatError (or ContentFilterError) when it gives up."""
        body = {"model": self.model, "messages": messages, "stream": False, **params}
        last: ChatError | None = None
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                return self._once(body)
            except _Retry as r:
                last, wait = r.error, r.retry_after
            except ChatError:
                raise
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, wait)
            log.warning("chat request to %s failed (%s); retry %d/%d in %.2fs",
                        self.shown, last, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        assert last is not None
        raise ChatError(f"{last} (gave up after {self.max_retries + 1} attempts)",
                        status=last.status, retryable=True)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], max_workers: int) -> Iterator[tuple[Any, Any]]:
        """Run fn(item) on a bounded thread pool; yield (item, result or exception) as each finishes."""
        return bounded_map(fn, items, max_workers)

    # ------------------------------------------------------------------ internals

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        return cap / 2 + random.uniform(0, cap / 2)  # jitter spreads out workers that failed together

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _key(self) -> tuple[int, str] | None:
        if not self.api_keys:
            return None
        with self._lock:
            i = next(self._next_key)
        return i, self.api_keys[i]

    def _once(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key is not None:
            headers["Authorization"] = f"Bearer {key[1]}"
        where = f"{self.shown_url}" + (f" (API key #{key[0] + 1} of {len(self.api_keys)})" if key else "")
        try:
            resp = self._post(body, headers)
        except requests.Timeout:
            raise _Retry(ChatError(f"timed out after {self.timeout}s waiting for {self.shown_url}", retryable=True))
        except requests.ConnectionError as e:
            raise _Retry(ChatError(f"cannot connect to {self.shown_url}: {type(e).__name__}", retryable=True))
        except _CONFIG_ERRORS as e:
            raise ChatError(f"bad request setup for {self.shown_url}: {type(e).__name__}") from None
        except requests.RequestException as e:  # e.g. the body was cut off mid-transfer
            raise _Retry(ChatError(f"request to {self.shown_url} failed: {type(e).__name__}", retryable=True))

        status = resp.status_code
        text = resp.text
        if status != 200:
            detail = self._scrub(_error_detail(text))
            if _is_content_filter(text):
                raise ContentFilterError(f"content filter at {where}: HTTP {status}: {detail}", status=status)
            msg = f"HTTP {status} from {where}: {detail}"
            if status in _RETRY_STATUSES or status >= 500:
                raise _Retry(ChatError(msg, status=status, retryable=True), _retry_after(resp))
            raise ChatError(msg, status=status, retryable=False)
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            if _is_content_filter(text):
                raise ContentFilterError(f"content filter at {where}", status=status)
            raise _Retry(ChatError(f"malformed response body from {where}: {self._scrub(text[:200])!r}",
                                   status=status, retryable=True))
        if choice.get("finish_reason") == "content_filter":
            raise ContentFilterError(f"content filter at {where} (finish_reason=content_filter)", status=status)
        if not isinstance(content, str):
            raise _Retry(ChatError(f"response from {where} has no text content", status=status, retryable=True))
        return content

    def _scrub(self, text: str) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        for k in [*self.api_keys, parts.password or "", parts.username or ""]:
            if len(k) >= 4:
                text = text.replace(k, "***")
        return _KEYLIKE.sub("***", text)


_SECRET_QUERY = {"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "sig", "signature",
                 "password", "secret"}


def redact_url(url: str) -> str:
    """`url` without user-info (`http://user:KEY@host` -> `http://***@host`) and with the values of key-like
    query parameters replaced by ***: what may be logged or written."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{k}=***" if k.lower() in _SECRET_QUERY else (f"{k}={v}" if v else k)
                     for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], max_workers: int) -> Iterator[tuple[Any, Any]]:
    """Run fn(item) on a thread pool and yield (item, result or exception) as each finishes. At most
    2 x max_workers items are in flight, so huge inputs stay cheap; stopping early cancels the rest."""
    max_workers = max(1, int(max_workers))
    it = iter(items)
    with cf.ThreadPoolExecutor(max_workers=max_workers) as pool:
        pending: dict[cf.Future, Any] = {}
        try:
            while True:
                for item in itertools.islice(it, 2 * max_workers - len(pending)):
                    pending[pool.submit(fn, item)] = item
                if not pending:
                    return
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    item = pending.pop(fut)
                    exc = fut.exception()
                    yield item, (exc if exc is not None else fut.result())
        finally:
            for fut in pending:
                fut.cancel()


class _Retry(Exception):
    """Internal: a transient failure, with the server's Retry-After in seconds if it sent one."""

    def __init__(self, error: ChatError, retry_after: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code") or err)[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300] or "(empty body)"


def _is_content_filter(text: str) -> bool:
    low = text.lower()
    return "content_filter" in low or "content_policy_violation" in low

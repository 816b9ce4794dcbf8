"""Wikidata grounding: fetch the entities of MQuAKE triples and render them as readable profiles.

Uses `wbgetentities` (batches of <= 50 ids), a second label pass for property and item ids, and
keeps the result in a grounding file (QID -> {id, label, description, properties}) so every
entity is fetched once across runs. Wikimedia asks every client for a User-Agent with a contact.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlparse

import requests

from eval.files import atomic_write_json, read_json

WIKIDATA_API = "https://www.wikidata.org/w/api.php"
CONTACT_ENV = "CODE_EDIT_CONTACT"
CLIENT_NAME = "code-edit-scaffold/0.1"
MAX_IDS_PER_CALL = 50  # wbgetentities refuses more for clients without the bot right
_QID = re.compile(r"^Q[1-9][0-9]*$")
_ENTITY_ID = re.compile(r"^[QP][1-9][0-9]*$")
_TIME = re.compile(r"^([+-]?)(\d+)-(\d\d)-(\d\d)T")
_WIKIMEDIA_HOSTS = ("wikidata.org", "wikimedia.org", "wikipedia.org")


class WikidataError(RuntimeError):
    """The Wikidata API could not give an answer (after retries) or refused the request."""


@dataclass
class WikidataConfig:
    url: str = WIKIDATA_API
    contact: str | None = None       # email or URL for the User-Agent; env CODE_EDIT_CONTACT
    batch_size: int = 50             # ids per entity request (<= 50)
    timeout: float = 120.0           # seconds, entity requests (they can be large)
    label_timeout: float = 45.0      # seconds, label-only requests
    max_tries: int = 4               # per request, on 429 / 5xx / timeouts / maxlag
    backoff: float = 2.0             # wait = min(backoff * 2**(try-1), max_backoff) unless Retry-After
    max_backoff: float = 10.0
    min_interval: float = 1.0        # polite rate: seconds between the starts of two requests
    maxlag: int | None = 5           # ask the API to refuse us while its replicas lag (then we wait)


def is_wikimedia(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in _WIKIMEDIA_HOSTS)


def user_agent(contact: str | None) -> str:
    who = contact.strip() if contact and contact.strip() else "no contact given"
    return f"{CLIENT_NAME} ({who}) python-requests/{requests.__version__}"


class WikidataClient:
    """A polite, retrying `wbgetentities` caller with an in-memory label cache."""

    def __init__(self, config: WikidataConfig | None = None, session: requests.Session | None = None):
        self.config = config or WikidataConfig()
        if not 1 <= self.config.batch_size <= MAX_IDS_PER_CALL:
            raise ValueError(f"batch_size must be in 1..{MAX_IDS_PER_CALL}, got {self.config.batch_size}")
        contact = self.config.contact or os.environ.get(CONTACT_ENV)
        self.contact = contact.strip() if contact and contact.strip() else None
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = user_agent(self.contact)
        self.labels: dict[str, str] = {}   # id -> English label, shared across batches
        self._last_start = 0.0
        self.requests_made = 0

    def check_allowed(self) -> None:
        """Refuse to call Wikimedia servers without a contact, as their User-Agent policy demands."""
        if is_wikimedia(self.config.url) and not self.contact:
            raise WikidataError(
                f"refusing to query {self.config.url} without a contact address: Wikimedia's "
                f"User-Agent policy requires one. Pass --contact YOUR_EMAIL_OR_URL or set "
                f"{CONTACT_ENV}.")

    def _get(self, params: dict[str, Any], timeout: float) -> dict:
        cfg = self.config
        params = {**params, "format": "json"}
        if cfg.maxlag is not None:
            params["maxlag"] = cfg.maxlag
        last = "no attempt made"
        for attempt in range(1, cfg.max_tries + 1):
            wait = time.monotonic() - self._last_start
            if wait < cfg.min_interval:
                time.sleep(cfg.min_interval - wait)
            self._last_start = time.monotonic()
            self.requests_made += 1
            retry_after = None
            try:
                resp = self.session.get(cfg.url, params=params, timeout=timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                retry_after = _retry_after(resp)
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}"
                elif resp.status_code != 200:
                    raise WikidataError(f"{cfg.url}: HTTP {resp.status_code}: {resp.text[:300]}")
                else:
                    try:
                        body = resp.json()
                    except ValueError:
                        body = None
                        last = "response was not JSON"
                    if isinstance(body, dict):
                        err = body.get("error")
                        if not err:
                            return body
                        code = err.get("code", "?")
                        if code != "maxlag":
                            raise WikidataError(f"{cfg.url}: API error {code}: {err.get('info', '')}")
                        last = f"maxlag ({err.get('info', '')})"
                    elif body is not None:
                        last = "response was not a JSON object"
            if attempt < cfg.max_tries:
                delay = retry_after if retry_after is not None else min(
                    cfg.backoff * 2 ** (attempt - 1), cfg.max_backoff)
                time.sleep(delay)
        raise WikidataError(f"{cfg.url}: gave up after {cfg.max_tries} tries; last problem: {last}")

    def get_entities(self, ids: list[str], props: str, timeout: float) -> dict[str, dict]:
        """`wbgetentities` for `ids` in chunks; returns the `entities` map keyed by the requested id."""
        out: dict[str, dict] = {}
        step = self.config.batch_size
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            body = self._get({"action": "wbgetentities", "ids": "|".join(chunk), "props": props,
                              "languages": "en"}, timeout)
            entities = body.get("entities")
            if not isinstance(entities, dict):
                raise WikidataError(f"{self.config.url}: answer has no 'entities' object")
            out.update(entities)
        return out

    def resolve_labels(self, ids: Iterable[str]) -> dict[str, str]:
        """English labels of property/item ids, fetched once per id per client."""
        todo = sorted({i for i in ids if i not in self.labels and _ENTITY_ID.match(i)})
        if todo:
            for key, ent in self.get_entities(todo, "labels", self.config.label_timeout).items():
                if "missing" in ent:
                    self.labels[key] = key
                else:
                    self.labels[key] = _english(ent.get("labels")) or key
        return self.labels

    def fetch_records(self, qids: list[str]) -> tuple[dict[str, dict], list[str]]:
        """Entity records for `qids` (one batch); returns (records by requested id, missing ids)."""
        raw = self.get_entities(qids, "labels|descriptions|claims", self.config.timeout)
        records: dict[str, dict] = {}
        missing: list[str] = []
        wanted: set[str] = set()
        for key, ent in raw.items():
            if "missing" in ent:
                missing.append(key)
                continue
            wanted.update(_referenced_ids(ent))
        labels = self.resolve_labels(wanted)
        for key, ent in raw.items():
            if "missing" not in ent:
                records[key] = render_entity(ent, labels)
        # An id the API neither answered nor reported missing is missing too.
        missing += [q for q in qids if q not in records and q not in missing]
        return records, missing


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return min(float(value), 300.0) if value is not None else None
    except ValueError:
        return None


def _english(field: Any) -> str:
    if isinstance(field, dict) and isinstance(field.get("en"), dict):
        return str(field["en"].get("value", ""))
    return ""


def _statements(ent: dict) -> Iterable[tuple[str, dict]]:
    claims = ent.get("claims") or {}
    if not isinstance(claims, dict):  # the API sends [] for an entity with no claims
        return
    for pid, stmts in claims.items():
        for st in stmts or []:
            # Deprecated statements are known to be wrong; they would only confuse the writer.
            if st.get("rank") == "deprecated":
                continue
            yield pid, st.get("mainsnak") or {}


def _item_id(value: dict) -> str | None:
    if value.get("id"):
        return str(value["id"])
    if "numeric-id" in value:
        prefix = "P" if value.get("entity-type") == "property" else "Q"
        return f"{prefix}{value['numeric-id']}"
    return None


def _unit_id(unit: str) -> str | None:
    tail = unit.rstrip("/").rsplit("/", 1)[-1]
    return tail if _ENTITY_ID.match(tail) else None


def _referenced_ids(ent: dict) -> set[str]:
    """Property ids, item values and quantity units whose labels rendering needs."""
    ids: set[str] = set()
    for pid, snak in _statements(ent):
        ids.add(pid)
        dv = snak.get("datavalue") or {}
        value = dv.get("value")
        if dv.get("type") == "wikibase-entityid" and isinstance(value, dict):
            ids.add(_item_id(value) or "")
        elif dv.get("type") == "quantity" and isinstance(value, dict):
            ids.add(_unit_id(str(value.get("unit", "1"))) or "")
    ids.discard("")
    return ids


def render_time(value: dict) -> str:
    """Wikidata time -> '1952', '1952-03' or '1952-03-11' by precision; years BCE get a suffix."""
    raw = str(value.get("time", ""))
    m = _TIME.match(raw)
    if not m:
        return raw
    sign, year, month, day = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    precision = int(value.get("precision", 11))
    if sign == "-":
        return f"{year} BCE"
    if precision <= 9 or month == "00":
        return str(year)
    if precision == 10 or day == "00":
        return f"{year:04d}-{month}"
    return f"{year:04d}-{month}-{day}"


def render_value(datavalue: dict, labels: dict[str, str]) -> str | None:
    """One claim value as text; None for kinds we do not render."""
    kind, value = datavalue.get("type"), datavalue.get("value")
    if kind == "string":
        return str(value)
    if not isinstance(value, dict):
        return None
    if kind == "wikibase-entityid":
        ident = _item_id(value)
        return labels.get(ident, ident) if ident else None
    if kind == "time":
        return render_time(value)
    if kind == "monolingualtext":
        return str(value.get("text", ""))
    if kind == "quantity":
        amount = str(value.get("amount", "")).lstrip("+")
        unit = _unit_id(str(value.get("unit", "1")))
        return f"{amount} {labels.get(unit, unit)}" if unit else amount
    if kind == "globecoordinate":
        return f"{value.get('latitude')}, {value.get('longitude')}"
    return None


def keep_property(label: str, datatype: str | None) -> bool:
    """Drop identifiers: external ids and properties labelled '... identifier' or '... ID'."""
    if datatype == "external-id":
        return False
    return "identifier" not in label.lower() and " ID" not in label


def render_entity(ent: dict, labels: dict[str, str]) -> dict:
    """Raw `wbgetentities` entity -> {id, label, description, properties: {label: [values]}}."""
    # A merged item answers under the id we asked for, with `id` naming the target; keep ours,
    # since the dataset's triples use it.
    redirect = ent.get("redirects") or {}
    ident = str(redirect.get("from") or ent.get("id", ""))
    properties: dict[str, list[str]] = {}
    for pid, snak in _statements(ent):
        if snak.get("snaktype", "value") != "value" or "datavalue" not in snak:
            continue  # "unknown value" / "no value" say nothing useful to a writer
        plabel = labels.get(pid, pid)
        if not keep_property(plabel, snak.get("datatype")):
            continue
        text = render_value(snak["datavalue"], labels)
        if text is None or text == "":
            continue
        values = properties.setdefault(plabel, [])
        if text not in values:
            values.append(text)
    record = {"id": ident, "label": _english(ent.get("labels")) or ident,
              "description": _english(ent.get("descriptions")), "properties": properties}
    if redirect.get("to"):
        record["redirected_to"] = str(redirect["to"])
    return record


def collect_entity_ids(cases: list[dict], source: str = "input") -> list[str]:
    """Subject and object QIDs of every triple in `orig.{triples,new_triples,edit_triples}`."""
    seen: dict[str, None] = {}
    for i, case in enumerate(cases):
        orig = case.get("orig") if isinstance(case, dict) else None
        if not isinstance(orig, dict):
            cid = case.get("case_id", f"#{i}") if isinstance(case, dict) else f"#{i}"
            raise ValueError(f"{source}: case {cid} has no 'orig' object with triples")
        for field in ("triples", "new_triples", "edit_triples"):
            for triple in orig.get(field) or []:
                if not isinstance(triple, (list, tuple)) or len(triple) != 3:
                    raise ValueError(f"{source}: case {case.get('case_id', f'#{i}')}: "
                                     f"orig.{field} holds {triple!r}, not a [subject, relation, object] triple")
                for q in (triple[0], triple[2]):
                    if isinstance(q, str) and _QID.match(q):
                        seen[q] = None
    return list(seen)


def ground(cases: list[dict], grounding_file: str, client: WikidataClient, *,
           source: str = "input", progress: bool = True) -> tuple[dict[str, dict], list[str]]:
    """Bring `grounding_file` up to date for `cases`; saves after every batch.

    Returns (grounding, missing QIDs). Missing entities are reported, not stored, so the file keeps
    the reference's QID -> record format.
    """
    grounding = read_json(grounding_file, "grounding file") if os.path.exists(grounding_file) else {}
    if not isinstance(grounding, dict):
        raise ValueError(f"{grounding_file}: expected a JSON object QID -> record")
    todo = [q for q in collect_entity_ids(cases, source) if q not in grounding]
    missing: list[str] = []
    if not todo:
        return grounding, missing
    client.check_allowed()
    step = client.config.batch_size
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo), desc="wikidata", unit="entity", disable=not progress, file=sys.stderr)
    try:
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            records, gone = client.fetch_records(chunk)
            grounding.update(records)
            missing += gone
            atomic_write_json(grounding_file, grounding)
            bar.update(len(chunk))
    finally:
        bar.close()
    if missing:
        print(f"wikidata: {len(missing)} entities missing (deleted or never existed): "
              f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}", file=sys.stderr)
    return grounding, missing

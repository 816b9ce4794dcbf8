"""Wikidata grounding against a fake `wbgetentities` server on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from scaffold.wikidata import (WIKIDATA_API, WikidataClient, WikidataConfig, WikidataError,
                               collect_entity_ids, ground, render_time)

DATA = Path(__file__).resolve().parents[1] / "eval" / "data" / "MQuAKE-hard.json"


def entity(qid: str, label: str, description: str = "", claims: dict | None = None) -> dict:
    return {"type": "item", "id": qid, "labels": {"en": {"language": "en", "value": label}},
            "descriptions": {"en": {"language": "en", "value": description}} if description else {},
            "claims": claims if claims is not None else []}


def snak(pid: str, datatype: str, dv_type: str, value, rank: str = "normal", snaktype: str = "value") -> dict:
    ms = {"snaktype": snaktype, "property": pid, "datatype": datatype}
    if snaktype == "value":
        ms["datavalue"] = {"type": dv_type, "value": value}
    return {"mainsnak": ms, "type": "statement", "rank": rank}


def item(qid: str) -> dict:
    return {"entity-type": "item", "numeric-id": int(qid[1:]), "id": qid}


class FakeWikidata:
    """Serves entities from `db`; `redirects` maps asked id -> target; `script` = statuses to send first."""

    def __init__(self):
        self.db: dict[str, dict] = {}
        self.redirects: dict[str, str] = {}
        self.script: list = []      # ints (HTTP status), "maxlag", or ("sleep", seconds)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                fake.requests.append({"params": q, "ua": self.headers.get("User-Agent"), "t": time.monotonic()})
                step = fake.script.pop(0) if fake.script else None
                if isinstance(step, tuple):
                    time.sleep(step[1])
                if isinstance(step, int):
                    return self._send(step, {"error": "scripted"})
                if step == "maxlag":
                    return self._send(200, {"error": {"code": "maxlag", "info": "Waiting for replicas"}})
                assert q.get("action") == "wbgetentities" and q.get("languages") == "en"
                self._send(200, {"entities": fake.answer(q["ids"].split("|"), q["props"]), "success": 1})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out on purpose (retry test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/w/api.php"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, ids: list[str], props: str) -> dict:
        out = {}
        for asked in ids:
            target = self.redirects.get(asked, asked)
            if target not in self.db:
                out[asked] = {"id": asked, "missing": ""}
                continue
            ent = dict(self.db[target])
            if props == "labels":
                ent = {"type": ent["type"], "id": ent["id"], "labels": ent["labels"]}
            if target != asked:
                ent["redirects"] = {"from": asked, "to": target}
            out[asked] = ent
        return out

    def entity_calls(self) -> list[list[str]]:
        return [r["params"]["ids"].split("|") for r in self.requests
                if r["params"].get("props") == "labels|descriptions|claims"]

    def label_calls(self) -> list[list[str]]:
        return [r["params"]["ids"].split("|") for r in self.requests if r["params"].get("props") == "labels"]


@pytest.fixture
def fake():
    f = FakeWikidata()
    yield f
    f.server.shutdown()
    f.server.server_close()


def client_for(fake: FakeWikidata, **kw) -> WikidataClient:
    cfg = dict(url=fake.url, contact="tests@example.org", min_interval=0.0, backoff=0.01, max_backoff=0.02)
    cfg.update(kw)
    return WikidataClient(WikidataConfig(**cfg))


def load_cases(n: int) -> list[dict]:
    return json.loads(DATA.read_text())[:n]


def test_collect_ids_from_real_case():
    case = load_cases(1)[0]  # case 7417: Hey Jude -> The Beatles / Madonna ...
    ids = collect_entity_ids([case])
    expected = {"Q607742", "Q1299", "Q203690", "Q145", "Q1860", "Q1744", "Q1058", "Q408", "Q13955"}
    assert set(ids) == expected and len(ids) == len(expected)
    with pytest.raises(ValueError, match="case 7 has no 'orig'"):
        collect_entity_ids([{"case_id": 7}], "x.json")


def test_batches_of_50_and_cache(fake, tmp_path):
    cases = load_cases(20)
    ids = collect_entity_ids(cases)
    assert len(ids) > 100  # needs at least three entity calls
    for q in ids:
        fake.db[q] = entity(q, f"Label {q}", claims={"P31": [snak("P31", "wikibase-item", "wikibase-entityid", item("Q5"))]})
    fake.db["Q5"] = entity("Q5", "human")
    fake.db["P31"] = {"type": "property", "id": "P31", "labels": {"en": {"value": "instance of"}}}
    path = tmp_path / "grounding.json"
    grounding, missing = ground(cases, str(path), client_for(fake), progress=False)
    calls = fake.entity_calls()
    assert [len(c) for c in calls] == [50] * (len(ids) // 50) + ([len(ids) % 50] if len(ids) % 50 else [])
    assert sorted(q for c in calls for q in c) == sorted(ids)  # each entity asked for exactly once
    assert missing == [] and set(grounding) == set(ids)
    assert json.loads(path.read_text()) == grounding
    rec = grounding[ids[0]]
    assert rec == {"id": ids[0], "label": f"Label {ids[0]}", "description": "", "properties": {"instance of": ["human"]}}
    # labels of P31 and Q5 are fetched once, not once per batch
    assert sorted(q for c in fake.label_calls() for q in c) == ["P31", "Q5"]
    assert all(r["ua"].startswith("code-edit-scaffold/") and "tests@example.org" in r["ua"] for r in fake.requests)
    n = len(fake.requests)
    ground(cases, str(path), client_for(fake), progress=False)
    assert len(fake.requests) == n  # everything cached: no request at all


def test_redirect_and_missing(fake, tmp_path):
    fake.db["Q20"] = entity("Q20", "Target", "the merged item")
    fake.redirects["Q2"] = "Q20"
    fake.db["Q4"] = entity("Q4", "Plain")
    cases = [{"case_id": 1, "orig": {"triples": [["Q2", "P1", "Q3"]], "new_triples": [["Q2", "P1", "Q4"]]}}]
    path = tmp_path / "g.json"
    grounding, missing = ground(cases, str(path), client_for(fake), progress=False)
    assert missing == ["Q3"]
    assert set(grounding) == {"Q2", "Q4"}
    assert grounding["Q2"] == {"id": "Q2", "label": "Target", "description": "the merged item",
                               "properties": {}, "redirected_to": "Q20"}


def test_property_filter_and_value_rendering(fake, tmp_path):
    props = {"P31": ("instance of", "wikibase-item"), "P569": ("date of birth", "time"),
             "P570": ("date of death", "time"), "P2048": ("height", "quantity"),
             "P1477": ("birth name", "monolingualtext"), "P214": ("VIAF cluster ID", "external-id"),
             "P646": ("Freebase ID", "string"), "P213": ("ISNI identifier", "string"),
             "P1082": ("population", "quantity"), "P106": ("occupation", "wikibase-item"),
             "P18": ("image", "commonsMedia"), "P571": ("inception", "time"), "P625": ("coordinate location", "globe-coordinate")}
    for pid, (label, _) in props.items():
        fake.db[pid] = {"type": "property", "id": pid, "labels": {"en": {"value": label}}}
    fake.db["Q5"] = entity("Q5", "human")
    fake.db["Q11573"] = entity("Q11573", "metre")
    fake.db["Q36180"] = entity("Q36180", "writer")
    fake.db["Q33999"] = entity("Q33999", "actor")
    t = lambda s, p: {"time": s, "precision": p, "timezone": 0, "calendarmodel": "http://www.wikidata.org/entity/Q1985727"}
    claims = {
        "P31": [snak("P31", "wikibase-item", "wikibase-entityid", item("Q5"))],
        "P569": [snak("P569", "time", "time", t("+1952-03-11T00:00:00Z", 11))],
        "P570": [snak("P570", "time", "time", t("+2001-00-00T00:00:00Z", 9))],
        "P571": [snak("P571", "time", "time", t("+1960-05-00T00:00:00Z", 10)),
                 snak("P571", "time", "time", t("-0500-00-00T00:00:00Z", 9))],
        "P2048": [snak("P2048", "quantity", "quantity", {"amount": "+1.83", "unit": "http://www.wikidata.org/entity/Q11573"})],
        "P1082": [snak("P1082", "quantity", "quantity", {"amount": "+42", "unit": "1"})],
        "P1477": [snak("P1477", "monolingualtext", "monolingualtext", {"text": "Douglas Noel Adams", "language": "en"})],
        "P214": [snak("P214", "external-id", "string", "113230702")],
        "P646": [snak("P646", "string", "string", "/m/0282x")],
        "P213": [snak("P213", "string", "string", "0000 0000 8045 6315")],
        "P106": [snak("P106", "wikibase-item", "wikibase-entityid", item("Q36180")),
                 snak("P106", "wikibase-item", "wikibase-entityid", item("Q33999"), rank="deprecated"),
                 snak("P106", "wikibase-item", "wikibase-entityid", None, snaktype="somevalue"),
                 snak("P106", "wikibase-item", "wikibase-entityid", item("Q36180"), rank="preferred")],
        "P18": [snak("P18", "commonsMedia", "string", "Douglas adams portrait.jpg")],
        "P625": [snak("P625", "globe-coordinate", "globecoordinate", {"latitude": 52.2, "longitude": 0.1})],
    }
    fake.db["Q42"] = entity("Q42", "Douglas Adams", "English writer and humorist", claims)
    cases = [{"case_id": 9, "orig": {"triples": [["Q42", "P106", "Q36180"]], "new_triples": [], "edit_triples": []}}]
    grounding, _ = ground(cases, str(tmp_path / "g.json"), client_for(fake), progress=False)
    assert grounding["Q42"] == {
        "id": "Q42", "label": "Douglas Adams", "description": "English writer and humorist",
        "properties": {
            "instance of": ["human"], "date of birth": ["1952-03-11"], "date of death": ["2001"],
            "inception": ["1960-05", "500 BCE"], "height": ["1.83 metre"], "population": ["42"],
            "birth name": ["Douglas Noel Adams"], "occupation": ["writer"],
            "image": ["Douglas adams portrait.jpg"], "coordinate location": ["52.2, 0.1"]}}
    # the label pass asked for properties, item values and units only, at most 50 ids at a time
    asked = {q for c in fake.label_calls() for q in c}
    assert {"P31", "P214", "Q5", "Q11573", "Q36180"} <= asked and "Q42" not in asked


def test_render_time_reference_forms():
    assert render_time({"time": "+1879-03-14T00:00:00Z", "precision": 11}) == "1879-03-14"
    assert render_time({"time": "+1879-00-00T00:00:00Z", "precision": 11}) == "1879"  # -00-00 means a year
    assert render_time({"time": "+0800-12-25T00:00:00Z", "precision": 11}) == "0800-12-25"


def test_retries_on_429_5xx_maxlag_and_timeout(fake, tmp_path):
    fake.db["Q1"] = entity("Q1", "Universe")
    fake.script = [429, 503, "maxlag", ("sleep", 1.0)]
    cases = [{"case_id": 1, "orig": {"triples": [["Q1", "P1", "Q1"]]}}]
    client = client_for(fake, max_tries=5, timeout=0.3)
    grounding, _ = ground(cases, str(tmp_path / "g.json"), client, progress=False)
    assert grounding["Q1"]["label"] == "Universe"
    assert len(fake.entity_calls()) == 5  # four failures, then the answer


def test_gives_up_after_max_tries_and_stops_on_4xx(fake, tmp_path):
    fake.db["Q1"] = entity("Q1", "Universe")
    cases = [{"case_id": 1, "orig": {"triples": [["Q1", "P1", "Q1"]]}}]
    fake.script = [500, 502, 503]
    with pytest.raises(WikidataError, match="gave up after 3 tries; last problem: HTTP 503"):
        ground(cases, str(tmp_path / "g.json"), client_for(fake, max_tries=3), progress=False)
    assert len(fake.requests) == 3 and not (tmp_path / "g.json").exists()
    fake.requests.clear()
    fake.script = [403]
    with pytest.raises(WikidataError, match="HTTP 403"):
        ground(cases, str(tmp_path / "g.json"), client_for(fake, max_tries=3), progress=False)
    assert len(fake.requests) == 1  # a client error is not retried


def test_polite_interval_between_requests(fake, tmp_path):
    fake.script = [500, 500]
    fake.db["Q1"] = entity("Q1", "Universe")
    cases = [{"case_id": 1, "orig": {"triples": [["Q1", "P1", "Q1"]]}}]
    ground(cases, str(tmp_path / "g.json"), client_for(fake, min_interval=0.15, backoff=0.0), progress=False)
    starts = [r["t"] for r in fake.requests]
    assert len(starts) == 3
    assert all(b - a >= 0.14 for a, b in zip(starts, starts[1:]))


def test_refuses_wikidata_without_contact(monkeypatch, tmp_path):
    monkeypatch.delenv("CODE_EDIT_CONTACT", raising=False)
    client = WikidataClient(WikidataConfig(url=WIKIDATA_API))
    cases = [{"case_id": 1, "orig": {"triples": [["Q1", "P1", "Q2"]]}}]
    with pytest.raises(WikidataError, match="CODE_EDIT_CONTACT"):
        ground(cases, str(tmp_path / "g.json"), client, progress=False)
    assert client.requests_made == 0
    monkeypatch.setenv("CODE_EDIT_CONTACT", "me@example.org")
    ok = WikidataClient(WikidataConfig(url=WIKIDATA_API))
    ok.check_allowed()
    assert "(me@example.org)" in ok.session.headers["User-Agent"]
    with pytest.raises(ValueError, match="batch_size"):
        WikidataClient(WikidataConfig(batch_size=51))

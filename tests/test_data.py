"""code_edit.data: reference ordering (docs/method.md 7.1), batch grouping (3.7), pinned download with sha256
check against a fake HTTP server on 127.0.0.1, bundled MQuAKE-hard with articles, edit requests."""
import gzip
import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from code_edit import data as D


def make_case(cid, hops=2, rewrites=(("S", "P1", "New"),)):
    return {
        "case_id": cid,
        "requested_rewrite": [
            {"prompt": "{} is owned by", "subject": s, "relation_id": rel, "question": f"Who owns {s}?",
             "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": "Old", "id": "Q2"},
             "article": f"<h1>{s}</h1><p>now {new}</p>"}
            for s, rel, new in rewrites
        ],
        "questions": [f"q{cid}?"],
        "new_answer": "New",
        "new_answer_alias": [],
        "new_single_hops": [{"question": "q?", "cloze": "c", "answer": "a", "answer_alias": []}] * hops,
    }


# ------------------------------------------------------------------------------------------------
# Ordering

HOPS = [3, 2, 4, 2, 3, 3, 2, 4, 2, 3, 2, 4, 2]  # first appearance: 3, then 2, then 4
CASES = [make_case(100 + i, h) for i, h in enumerate(HOPS)]


def reference_groups(seed):
    """The documented algorithm, written out with the `random` module itself."""
    first_seen = []
    for h in HOPS:
        if h not in first_seen:
            first_seen.append(h)
    groups = {h: [100 + i for i, x in enumerate(HOPS) if x == h] for h in first_seen}
    state = random.getstate()
    random.seed(seed)
    for h in first_seen:  # shuffled in order of first appearance, one RNG
        random.shuffle(groups[h])
    random.setstate(state)
    return groups


def round_robin(groups):
    queues = {h: list(v) for h, v in groups.items()}
    out = []
    while any(queues.values()):
        for h in sorted(queues):
            if queues[h]:
                out.append(queues[h].pop(0))
    return out


def ids(cases):
    return [c["case_id"] for c in cases]


def test_shuffle_round_robin_matches_reference():
    groups = reference_groups(70)
    expected = round_robin(groups)
    got = ids(D.order_cases(CASES, seed=70, max_cases=0))
    assert got == expected
    # hop pattern of the interleave: 2,3,4,2,3,4,... until groups run out
    hop_of = {c["case_id"]: D.hop_count(c) for c in CASES}
    assert [hop_of[i] for i in got] == [2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 2, 2]
    # the shuffling order of the groups matters; this data set tells the two apart
    random.seed(70)
    alt = {h: [100 + i for i, x in enumerate(HOPS) if x == h] for h in (2, 3, 4)}
    for h in (2, 3, 4):
        random.shuffle(alt[h])
    assert round_robin(alt) != expected


def test_hop_select_cut_and_skip():
    g2 = reference_groups(70)[2]
    assert ids(D.order_cases(CASES, seed=70, hop=2, max_cases=0)) == g2
    assert ids(D.order_cases(CASES, seed=70, hop=2, max_cases=4)) == g2[:4]
    assert ids(D.order_cases(CASES, seed=70, hop=2, max_cases=4, skip_cases=1)) == g2[1:4]
    assert ids(D.order_cases(CASES, seed=70, hop=2, max_cases=4, batch_mode=True)) == g2  # no cut in batch mode
    assert ids(D.order_cases(CASES, seed=5, max_cases=0)) == round_robin(reference_groups(5))
    with pytest.raises(D.DatasetError, match="no case has 5 hops"):
        D.order_cases(CASES, hop=5)
    with pytest.raises(D.DatasetError, match="skip_cases"):
        D.order_cases(CASES, skip_cases=1, batch_mode=True)


def test_ordering_leaves_global_random_alone():
    random.seed(123)
    a = random.random()
    random.seed(123)
    D.order_cases(CASES)
    assert random.random() == a


# ------------------------------------------------------------------------------------------------
# Batch grouping

def batch_cases():
    return [
        make_case(1, rewrites=[("s1", "P1", "n1"), ("s2", "P1", "n2")]),
        make_case(2, rewrites=[("s1", "P1", "n1"), ("s3", "P2", "n3")]),  # s1 edit repeats case 1's
        make_case(3, rewrites=[("s4", "P1", "n4"), ("s5", "P1", "n5"), ("s6", "P1", "n6")]),
        make_case(4, rewrites=[("s7", "P1", "n7")]),
    ]


def test_batch_groups_hand_built():
    cases = batch_cases()
    cases[1]["requested_rewrite"][0]["target_new"]["id"] = "Qother"  # key uses target_new.str only
    # cap 5: case 1 -> 2 edits, case 2 -> 3, case 3 -> 6 >= 5: stop after the whole case
    groups = D.batch_edit_groups(cases, 2, max_unique=5)
    assert [g.group_id for g in groups] == [1, 2, 3]
    assert [[k[0] for k in g.edit_keys] for g in groups] == [["s1", "s2"], ["s3", "s4"], ["s5", "s6"]]
    assert [[(r.case_id, r.rewrite_idx) for r in g.requests] for g in groups] == \
        [[(1, 0), (1, 1)], [(2, 1), (3, 0)], [(3, 1), (3, 2)]]
    assert [[c["case_id"] for c in g.cases] for g in groups] == [[1], [2, 3], [3]]
    assert groups[0].edit_keys[0] == ("s1", "P1", "n1")
    four = D.batch_edit_groups(cases, 4, max_unique=5)  # 6 edits -> one group of 4, two dropped
    assert len(four) == 1 and [k[0] for k in four[0].edit_keys] == ["s1", "s2", "s3", "s4"]
    assert [c["case_id"] for c in four[0].cases] == [1, 2, 3]
    with pytest.raises(D.DatasetError, match="only 7 unique edits"):
        D.batch_edit_groups(cases, 8, max_unique=8)
    for bad in (0, 91):
        with pytest.raises(D.DatasetError, match="between 1 and 90"):
            D.batch_edit_groups(cases, bad)
    del cases[3]["requested_rewrite"][0]["relation_id"]
    with pytest.raises(D.DatasetError, match="case_id 4.*relation_id"):
        D.batch_edit_groups(cases, 1)


def test_batch_groups_default_cap_90():
    cases = [make_case(i, rewrites=[(f"s{i}_{r}", "P1", "n") for r in range(4)]) for i in range(1, 26)]
    # 4 new edits per case: 22 cases give 88 < 90, case 23 brings 92; cases 24, 25 unused
    (g,) = D.batch_edit_groups(cases, 90)
    assert len(g.requests) == 90 and [c["case_id"] for c in g.cases] == list(range(1, 24))
    assert (g.requests[-1].case_id, g.requests[-1].rewrite_idx) == (23, 1)
    groups = D.batch_edit_groups(cases, 7)  # 92 // 7 = 13 groups, 91 edits
    assert len(groups) == 13 and sum(len(x.requests) for x in groups) == 91
    assert [c["case_id"] for c in groups[-1].cases] == [22, 23]  # edits 84..90 -> cases 22, 23


# ------------------------------------------------------------------------------------------------
# Download

@pytest.fixture()
def no_proxy(monkeypatch):
    for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture()
def server(no_proxy):
    state = {"status": 200, "body": b"[]", "hits": [], "lie_length": False, "gzip": False}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["hits"].append(self.path)
            body = gzip.compress(state["body"]) if state["gzip"] else state["body"]
            self.send_response(state["status"])
            if state["gzip"]:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body) + (100 if state["lie_length"] else 0)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


def served_path(name):
    return f"/CrashBugger/CODE/{D.REFERENCE_COMMIT}/CODE/datasets/{name}_causalenhanced.json"


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp"))] if folder.exists() else []


def test_download_records_then_verifies_sha256(tmp_path, server):
    url, state = server
    body = json.dumps([make_case(1), make_case(35)]).encode()
    state["body"] = body
    path = D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url)
    assert path == tmp_path / "datasets" / D.REFERENCE_COMMIT[:12] / "MQuAKE-T_causalenhanced.json"
    assert path.read_bytes() == body and state["hits"] == [served_path("MQuAKE-T")]
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text() == f"{hashlib.sha256(body).hexdigest()}  MQuAKE-T_causalenhanced.json\n"
    # second use: from the cache, checked, no request
    assert D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url) == path and len(state["hits"]) == 1
    # a damaged cache is detected, not re-downloaded
    path.write_bytes(body + b" ")
    with pytest.raises(D.DatasetError, match="sha256") as e:
        D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url)
    assert str(path) in str(e.value) and len(state["hits"]) == 1
    # file gone, record kept, server now sends something else: refused, nothing cached
    path.unlink()
    state["body"] = json.dumps([make_case(2)]).encode()
    with pytest.raises(D.DatasetError, match="differs from the one recorded"):
        D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url)
    assert not path.exists() and leftovers(path.parent) == []
    # the original bytes are accepted again
    state["body"] = body
    assert D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url).read_bytes() == body


def test_gzip_transfer_hashes_the_decoded_file(tmp_path, server):
    url, state = server
    body = json.dumps([make_case(1)] * 50).encode()
    state.update(body=body, gzip=True)
    path = D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url)
    assert path.read_bytes() == body
    assert path.with_name(path.name + ".sha256").read_text().split()[0] == hashlib.sha256(body).hexdigest()


def test_hand_placed_cache_file_gets_recorded(tmp_path, server):
    url, state = server
    folder = tmp_path / "datasets" / D.REFERENCE_COMMIT[:12]
    folder.mkdir(parents=True)
    (folder / "MQuAKE-T_causalenhanced.json").write_bytes(b"[1]")
    D.fetch_dataset("MQuAKE-T", tmp_path, base_url=url)
    assert (folder / "MQuAKE-T_causalenhanced.json.sha256").read_text().split()[0] == hashlib.sha256(b"[1]").hexdigest()
    assert state["hits"] == []


@pytest.mark.parametrize("status, body, lie, match", [
    (404, b"Not Found", False, "HTTP 404"),
    (200, b"<html>oops</html>", False, "not valid JSON"),
    (200, b'{"a": 1}', False, "expected a JSON list"),
    (200, b"[1, 2, 3]", True, "could not download"),
])
def test_failed_download_names_url_and_leaves_nothing(tmp_path, server, status, body, lie, match):
    url, state = server
    state.update(status=status, body=body, lie_length=lie)
    with pytest.raises(D.DatasetError, match=match) as e:
        D.fetch_dataset("MQuAKE-CF-3k-v2", tmp_path, base_url=url, timeout=5)
    full_url = url + served_path("MQuAKE-CF-3k-v2")
    assert full_url in str(e.value)
    if status != 200 or lie:
        assert "--data_path" in str(e.value)
    folder = tmp_path / "datasets" / D.REFERENCE_COMMIT[:12]
    assert not (folder / "MQuAKE-CF-3k-v2_causalenhanced.json").exists() and leftovers(folder) == []
    assert not (folder / "MQuAKE-CF-3k-v2_causalenhanced.json.sha256").exists()


def test_unreachable_server_names_url(tmp_path, no_proxy):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    with pytest.raises(D.DatasetError) as e:
        D.fetch_dataset("MQuAKE-T", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}{served_path('MQuAKE-T')}" in msg and "--data_path" in msg


def test_default_url_is_pinned_github_raw():
    assert D.dataset_url("MQuAKE-T") == ("https://raw.githubusercontent.com/CrashBugger/CODE/"
                                         "291cb3e6fbd6213e67b7acbef79a541759615900/CODE/datasets/"
                                         "MQuAKE-T_causalenhanced.json")


def test_load_dataset_downloads_validates_and_excludes(tmp_path, server):
    url, state = server
    state["body"] = json.dumps([make_case(34), make_case(35), make_case(36)]).encode()
    cf = D.load_dataset("MQuAKE-CF-3k-v2", cache_root=tmp_path, base_url=url)
    assert ids(cf) == [34, 36]
    t = D.load_dataset("MQuAKE-T", cache_root=tmp_path, base_url=url)
    assert ids(t) == [34, 35, 36]  # case 35 is only excluded from CF-3k-v2
    # a downloaded *_causalenhanced file must have articles everywhere
    bad = make_case(1)
    del bad["requested_rewrite"][0]["article"]
    state["body"] = json.dumps([bad]).encode()
    with pytest.raises(ValueError, match="article"):
        D.load_dataset("MQuAKE-T", cache_root=tmp_path / "other", base_url=url)


def test_load_dataset_from_data_path(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps([make_case(35), make_case(7)]))
    assert ids(D.load_dataset("MQuAKE-CF-3k-v2", data_path=p)) == [7]
    assert ids(D.load_dataset("anything", data_path=p)) == [35, 7]
    with pytest.raises(D.DatasetError, match="unknown dataset 'MQuAKE-X'"):
        D.load_dataset("MQuAKE-X")


def test_mquake_hard_bundled_with_articles():
    cases = D.load_dataset("MQuAKE-hard")
    assert len(cases) == 429
    with_articles = {c["case_id"] for c in cases if D.case_has_articles(c)}
    assert with_articles == {7663, 7774, 7876, 7878, 7895, 7983, 8046, 8072, 8198, 8351, 8371, 8377, 8426,
                             8646, 8661, 8772, 8827, 9063, 9126, 9167}
    assert all(D.hop_count(c) == 4 for c in cases)


def test_edit_requests_from_a_real_case():
    case = next(c for c in D.load_dataset("MQuAKE-hard") if c["case_id"] == 7663)
    reqs = D.edit_requests(case)
    assert len(reqs) == 4
    rw = case["requested_rewrite"][0]
    r = reqs[0]
    assert (r.case_id, r.rewrite_idx, r.subject, r.question) == (7663, 0, rw["subject"], rw["question"])
    assert r.cloze == rw["prompt"].format(rw["subject"]) + " ?"
    assert (r.old_answer, r.new_answer) == (rw["target_true"]["str"], rw["target_new"]["str"])
    assert r.article == rw["article"] and r.article.startswith("<h1>")
    assert r.rephrase_questions == () and r.learning_questions == ()
    other = next(c for c in D.load_dataset("MQuAKE-hard") if not D.case_has_articles(c))
    assert D.edit_requests(other)[0].article is None

"""eval.mquake: loading and validating MQuAKE-format files, and attaching generated articles."""
import copy
import json
from pathlib import Path

import pytest

from eval.mquake import MQuAKEFormatError, attach_articles, load_articles, load_mquake, target_str

DATA = Path(__file__).resolve().parents[1] / "eval" / "data"


@pytest.fixture(scope="module")
def hard():
    return load_mquake(DATA / "MQuAKE-hard.json")


def test_bundled_hard_loads(hard):
    assert len(hard) == 429
    assert all(len(c["requested_rewrite"]) == 4 and len(c["questions"]) == 3 for c in hard)
    assert hard[0]["case_id"] == 7417


def _write(tmp_path, cases, name="bad.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cases))
    return p


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["requested_rewrite"][2].pop("subject"), "requested_rewrite[2].subject"),
    (lambda c: c["requested_rewrite"][1].__setitem__("target_new", {"id": "Q1"}), "requested_rewrite[1].target_new.str"),
    (lambda c: c["requested_rewrite"][0].__setitem__("prompt", "no slot"), "requested_rewrite[0].prompt"),
    (lambda c: c["new_single_hops"][3].__setitem__("answer_alias", "x"), "new_single_hops[3].answer_alias"),
    (lambda c: c["new_single_hops"][0].pop("cloze"), "new_single_hops[0].cloze"),
    (lambda c: c.__setitem__("questions", []), "questions"),
    (lambda c: c.__setitem__("new_answer", 3), "new_answer"),
    (lambda c: c["orig"]["triples"].__setitem__(0, ["a", "b"]), "orig.triples[0]"),
])
def test_bad_record_names_file_case_and_field(tmp_path, hard, mutate, field):
    cases = copy.deepcopy(hard[:3])
    mutate(cases[1])
    p = _write(tmp_path, cases)
    with pytest.raises(MQuAKEFormatError) as ei:
        load_mquake(p)
    msg = str(ei.value)
    assert "bad.json" in msg and f"case_id {cases[1]['case_id']}" in msg and f"'{field}'" in msg


def test_file_level_errors(tmp_path, hard):
    with pytest.raises(MQuAKEFormatError, match="nope.json: file not found"):
        load_mquake(tmp_path / "nope.json")
    p = tmp_path / "trunc.json"
    p.write_text(json.dumps(hard[:2])[:-40])
    with pytest.raises(MQuAKEFormatError, match="trunc.json: invalid JSON"):
        load_mquake(p)
    with pytest.raises(MQuAKEFormatError, match="duplicate"):
        load_mquake(_write(tmp_path, [hard[0], hard[0]]))
    with pytest.raises(MQuAKEFormatError, match="record #0: field 'case_id'"):
        load_mquake(_write(tmp_path, [dict(hard[0], case_id="7417")]))
    with pytest.raises(MQuAKEFormatError, match=r"requested_rewrite\[0\].article"):
        load_mquake(_write(tmp_path, hard[:1]), require_articles=True)


def test_attach_articles_copies_and_reports_missing(tmp_path, hard):
    articles = load_articles(DATA / "MQuAKE-hard_articles_dev.json")
    cases = [c for c in hard if c["case_id"] in (7417, 7663)]
    before = copy.deepcopy(cases)
    merged, missing = attach_articles(cases, articles)
    assert cases == before  # the caller's dicts are untouched
    assert missing == [f"7417_{r}" for r in range(4)]
    by_id = {c["case_id"]: c for c in merged}
    for r in range(4):
        assert by_id[7663]["requested_rewrite"][r]["article"] == articles[f"7663_{r}"]["article"]
        assert "article" not in by_id[7417]["requested_rewrite"][r]
    # A causal-enhanced file round-trips through the validator with require_articles.
    p = _write(tmp_path, [by_id[7663]], "x_causalenhanced.json")
    assert load_mquake(p, require_articles=True)[0]["requested_rewrite"][3]["article"].startswith("<h1>")


def test_attach_articles_rejects_mismatched_entry(hard):
    case = next(c for c in hard if c["case_id"] == 7663)
    entry = {"case_id": 7663, "rewrite_idx": 1, "new_answer": "cricket", "article": "<h1>x</h1>"}
    with pytest.raises(MQuAKEFormatError, match="7663_1.*new_answer 'cricket'.*rugby union"):
        attach_articles([case], {"7663_1": entry})
    with pytest.raises(MQuAKEFormatError, match="7663_2"):
        attach_articles([case], {"7663_2": {"case_id": 7663, "rewrite_idx": 2, "article": "  "}})


def test_target_str():
    assert target_str({"str": "Madonna", "id": "Q1744"}) == "Madonna"
    assert target_str("Madonna") == "Madonna"

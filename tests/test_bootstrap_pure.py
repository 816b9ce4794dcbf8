"""code_edit.bootstrap (model-free parts): thought extraction, validity filter (every banned phrase),
best-candidate choice, the on-disk candidate cache, noncausal padding, SFT examples and schedule."""
import hashlib
import json
import multiprocessing as mp

import pytest

from code_edit import bootstrap as B
from code_edit import bootstrap_cache as C
from code_edit.prompts import closed_book_user_content

GOOD = "Old fact: The Beatles performed it. Reason for change: rights moved. Updated fact: Madonna. Derivation: so Madonna."


@pytest.mark.parametrize("text, want", [
    ("<think>\nabc def\n</think>\nThe answer now is X.", "abc def"),
    ("  <THINK>abc</Think> trailing", "abc"),
    ("<think>first</think> <think>second</think>", "first"),
    ("<think>reasoning The answer now is X.</think>", "reasoning"),
    ("<think>reasoning\nthe ANSWER now is X</think>", "reasoning"),
    ("<think><thinking>nested</thinking></think>", "nested"),
    ("bare reasoning\n</think>\nThe answer now is X.", "bare reasoning"),  # opening tag already in the prompt
    ("no tags at all. The answer now is X.", "no tags at all."),
    ("no tags and no answer", "no tags and no answer"),
    ("<think>unclosed reasoning The answer now is X.", "unclosed reasoning"),
    ("<think>\n\n</think>\nThe answer now is X.", None),  # empty block: nothing to learn from
    ("The answer now is X.", None),
    ("", None),
    ("theanswer now is glued", "theanswer now is glued"),  # word boundary on the cut
])
def test_extract_thought(text, want):
    assert B.extract_thought(text) == want


def test_valid_thought_word_count():
    assert B.is_valid_thought("one two three four five")
    assert not B.is_valid_thought("one two three four")
    assert B.invalid_reason("one two three four") == "fewer than 5 words"
    assert B.is_valid_thought("one two three", min_words=3)
    assert not B.is_valid_thought(None) and not B.is_valid_thought("")


@pytest.mark.parametrize("phrase", B.BANNED_PHRASES)
def test_each_banned_phrase_rejects(phrase):
    for variant in (phrase, phrase.upper(), phrase.title()):
        thought = f"Old fact was different, {variant} and so the new fact holds now."
        assert not B.is_valid_thought(thought), variant
        assert B.invalid_reason(thought).lower() == f"contains {phrase!r}".lower()


def test_banned_list_is_the_reference_list():
    assert len(B.BANNED_PHRASES) == 20
    assert B.BANNED_PHRASES[0] == "the answer now is" and B.BANNED_PHRASES[-1] == "available information"


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<thinking>", "</THINKING>"])
def test_think_tags_reject(tag):
    assert not B.is_valid_thought(f"a perfectly normal thought {tag} with words")


@pytest.mark.parametrize("text", [
    "The data was unavailable information wise until the merger last year.",  # 'unavailable' != 'available'
    "They printed cheat sheets for the exam before the change happened.",  # 'sheets' != 'sheet'
    "The reuser provided nothing and then the owner sold the rights.",  # 'reuser' != 'user'
    "She was told about it in 2019, then the label moved.",  # 'was told' without 'i'
])
def test_word_boundaries(text):
    assert B.is_valid_thought(text), B.invalid_reason(text)


def test_choose_thought_picks_highest_valid():
    cands = [
        "<think>too short</think>The answer now is M.",  # invalid: 2 words
        f"<think>{GOOD} v1</think>The answer now is M.",
        "<think>According to the cheat sheet it is Madonna now.</think>",  # invalid: leak
        f"<think>{GOOD} v2</think>\nThe answer now is Z.",  # the candidate's own answer is ignored
        f"<think>{GOOD} v3</think>",
    ]
    seen = []

    def score(thoughts):
        seen.extend(thoughts)
        return [{"v1": 0.2, "v2": 0.9, "v3": 0.5}[t[-2:]] for t in thoughts]

    assert B.choose_thought(cands, score) == f"{GOOD} v2"
    assert seen == [f"{GOOD} v1", f"{GOOD} v2", f"{GOOD} v3"]  # only valid thoughts get scored
    # ties go to the first
    assert B.choose_thought(cands, lambda ts: [1.0] * len(ts)) == f"{GOOD} v1"
    assert B.choose_thought(cands[:1] + cands[2:3], score) is None
    with pytest.raises(ValueError, match="2 rewards for 3 thoughts"):
        B.choose_thought(cands, lambda ts: [0.0, 1.0])


def test_noncausal_thoughts_pad():
    assert B.noncausal_thoughts(["a", None, "b", "c"], 2, "M") == ["a", "b"]
    assert B.noncausal_thoughts(["a", None], 3, "M") == ["a", "Updated answer: M", "Updated answer: M"]


# ------------------------------------------------------------------------------------------------
# Cache

def test_cache_key_format_and_stability():
    art = "<h1>Madonna</h1><p>now.</p>"
    key = C.cache_key("Qwen/Qwen2.5-7B-Instruct", "Who performed Hey Jude?", 3, art)
    expected_hash = hashlib.shake_128(art.encode("utf-8")).hexdigest(10)
    assert len(expected_hash) == 20
    assert key == f"qwen/qwen2.5-7b-instruct|who performed hey jude?_3|{expected_hash}"
    # pinned literal: a change of the key scheme would orphan every user's cache
    assert C.cache_key("M", "Q", 0, "A") == "m|q_0|a5ba3aeee1525b4ae543"
    assert C.cache_key("M", "Q", 0, "A") != C.cache_key("M", "Q", 1, "A") != C.cache_key("M", "Q", 0, "B")


def test_cache_miss_put_hit(tmp_path):
    d = tmp_path / "cache"
    key = C.cache_key("m", "Who?", 0, "art")
    assert C.cache_get(d, key) is None
    C.cache_put(d, key, z_star="thought zero", new_answer="New", old_answer="Old", question="Who?")
    entry = C.cache_get(d, key)
    assert entry == {"key": key, "z_star": "thought zero", "new_answer": "New", "old_answer": "Old", "question": "Who?"}
    assert C.cache_get(d, C.cache_key("m", "Who?", 0, "other article")) is None
    C.cache_put(d, C.cache_key("m", "Who?", 2, "art"), z_star="t2", new_answer="N", old_answer="O", question="Who?")
    found, missing = C.cached_replicas(d, "M", "WHO?", "art", 4)  # model and question are case-blind
    assert found == {0: "thought zero", 2: "t2"} and missing == [1, 3]
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_cache_damaged_entry_is_a_miss(tmp_path, caplog):
    key = C.cache_key("m", "q", 0, "a")
    path = C.cache_put(tmp_path, key, z_star="z", new_answer="n", old_answer="o", question="q")
    path.write_text('{"key": "m|q_0|', encoding="utf-8")
    assert C.cache_get(tmp_path, key) is None
    assert "unreadable" in caplog.text
    path.write_text(json.dumps({"key": "something else", "z_star": "z"}))
    assert C.cache_get(tmp_path, key) is None
    C.cache_put(tmp_path, key, z_star="fresh", new_answer="n", old_answer="o", question="q")
    assert C.cache_get(tmp_path, key)["z_star"] == "fresh"


def _writer(args):
    d, tag, n = args
    for i in range(n):
        C.cache_put(d, C.cache_key("m", "q", i % 3, "a"), z_star=f"{tag}{i};" * 300,
                    new_answer="n", old_answer="o", question="q")


def test_cache_concurrent_writers_never_leave_a_torn_entry(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=((tmp_path, t, 60),)) for t in ("a", "b")]
    for p in procs:
        p.start()
    paths = [C._entry_path(tmp_path, C.cache_key("m", "q", r, "a")) for r in range(3)]
    reads = 0
    while any(p.is_alive() for p in procs):
        for path in paths:
            try:
                raw = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # not written yet
            z = json.loads(raw)["z_star"]  # a torn file would fail to parse here
            unit = z[: z.index(";") + 1]
            assert z == unit * 300  # one writer's whole value, never a mix
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reads > 0  # the readers really overlapped the writers
    final = [C.cache_get(tmp_path, C.cache_key("m", "q", r, "a")) for r in range(3)]
    assert all(e is not None and e["z_star"][0] in "ab" for e in final)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert len(list(tmp_path.glob("*.json"))) == 3


# ------------------------------------------------------------------------------------------------
# SFT

@pytest.mark.parametrize("mode", ["causal", "noncausal"])
def test_sft_example(mode):
    ex = B.sft_example("Who?", "  my thought ", "Madonna", mode=mode)
    assert ex["prompt"] == [{"role": "user", "content": closed_book_user_content("Who?", mode)}]
    assert ex["completion"] == [{"role": "assistant",
                                 "content": "<think>\nmy thought\n</think>\nThe answer now is Madonna."}]
    native = B.sft_example("Who?", "t", "M", mode=mode, native_thinking=True)
    assert native["completion"][0]["content"] == "t\n</think>\nThe answer now is M."

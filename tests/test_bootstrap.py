"""code_edit.bootstrap, model-dependent part: the reward is scored on the right tokens for ChatML and
Llama-3 (against a naive full-vocabulary forward), cached replicas skip generation, replicas without a
valid candidate are resampled then skipped, noncausal mode pads, and SFT examples end with end-of-turn."""
import dataclasses
import json
import logging
import math

import pytest
import torch
from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers

import code_edit.bootstrap as B
import code_edit.bootstrap_cache as C
import code_edit.tokens as T
from code_edit.config import load_hparams
from code_edit.data import EditRequest
from code_edit.prompts import answer_sentence, completion_text, reward_messages
from model import load_model, load_tokenizer
from model.generate import Completion


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu"), load_tokenizer("tiny-random")


@pytest.fixture()
def llama3_tok(tmp_path):
    """A small Llama-3-style tokenizer (one token per character, Llama-3's special tokens)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    tk = HFTok(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return load_tokenizer(tmp_path)


def naive_reward(model, tok, question, answer, thought):
    """Independent reference: tokenise prefix and answer sentence apart (they split cleanly at the
    newline before "The"), run one unpadded full-vocabulary forward, average the sentence's log-probs."""
    text = tok.chat(reward_messages(question)) + completion_text(thought, answer)
    span = answer_sentence(answer)
    assert text.endswith(span)
    prefix, ids = tok.encode(text[: -len(span)]), tok.encode(text)
    assert ids[: len(prefix)] == prefix and tok.decode(ids[len(prefix):]).replace(" ", "") == span.replace(" ", "")
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    lps = [float(logp[j - 1, ids[j]]) for j in range(len(prefix), len(ids))]
    return math.exp(sum(lps) / len(lps)), ids


THOUGHTS = ["Old fact: Madrid. Reason for change: a vote moved it. Updated fact: Rome.",
            "short one here ok",
            # Contains the sentence itself: the LAST occurrence (the real answer line) must be scored.
            "Someone said The answer now is Rome. earlier, and a much longer thought follows here " * 3]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_reward_scores_the_answer_span_both_families(tiny, llama3_tok, family):
    model = tiny[0]
    tok = tiny[1] if family == "chatml" else llama3_tok
    assert tok.family == family
    got = B.score_thoughts(model, tok, "Where is the capital?", "Rome", THOUGHTS)  # padded batch of 3
    for t, g in zip(THOUGHTS, got):
        want, ids = naive_reward(model, tok, "Where is the capital?", "Rome", t)
        assert g == pytest.approx(want, rel=1e-4)
    # the scored tokens decode to exactly the last answer sentence
    text = tok.chat(reward_messages("Q?")) + completion_text(THOUGHTS[2], "Rome")
    ids, pos = T.answer_span_positions(tok, text, answer_sentence("Rome"))
    if family == "llama3":  # the chat string carries BOS; it is parsed once, never added again
        bos = tok.token_to_id("<|begin_of_text|>")
        assert ids[0] == bos and ids.count(bos) == 1
    assert pos == list(range(pos[0], len(ids))) and pos[0] > len(ids) // 2
    assert tok.decode([ids[p] for p in pos]).replace(" ", "") == "TheanswernowisRome."


def test_span_logprobs_batch_split_is_exact(tiny):
    model, tok = tiny
    seqs = [tok.encode("a b c d e f g"), tok.encode("hello there friend"), tok.encode("x y")]
    pos = [[2, 3], [1, 2], [1]]
    one = B.span_mean_logprobs(model, seqs, pos, max_tokens=1)  # one sequence per forward
    big = B.span_mean_logprobs(model, seqs, pos, max_tokens=10_000)
    assert one == pytest.approx(big, abs=1e-5)


def req(q="Who owns Acme?", article="<p>Globex bought Acme.</p>"):
    return EditRequest(case_id=7, rewrite_idx=0, subject="Acme", prompt="{} is owned by", question=q,
                       old_answer="Initech", new_answer="Globex", article=article, relation_id="P1")


def fake_generate(tok, script, calls):
    """generate() stand-in: round k returns script[k] texts (cycled to each prompt's sample count, which
    the bootstrap passes per prompt, with a seed per prompt)."""
    def gen(model, prompts, *, max_new_tokens, temperature, top_p, num_samples, stop_ids, seed, **kw):
        texts = script[min(len(calls), len(script) - 1)]
        calls.append({"prompts": prompts, "num_samples": num_samples, "temperature": temperature, "top_p": top_p,
                      "seed": seed, "max_new_tokens": max_new_tokens})
        return [Completion(i, s, tok.encode(texts[s % len(texts)]), [], "stop")
                for i, n in enumerate(num_samples) for s in range(n)]
    return gen


VALID = ["<think>\nOld fact: Initech. Reason for change: Globex bought it outright. Updated fact: Globex.\n</think>\n"
         "The answer now is Globex.",
         "<think>Globex acquired the whole company last year in a deal</think> The answer now is Globex.",
         "<think>\nOld fact: Initech. Reason for change: a merger. Updated fact: Globex now.\n</think>",
         "<think>too short</think>"]


def test_cache_hit_skips_generation_and_miss_fills_cache(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = load_hparams("tiny")  # 2 replicas x 4 candidates
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [VALID], calls))
    r = req()
    # Replica 1 already cached: only replica 0 is generated, in ONE call of 1 x num_samples samples.
    C.cache_put(tmp_path, C.cache_key("tiny-random", r.question, 1, r.article), z_star="cached thought one two three",
                new_answer="Globex", old_answer="Initech", question=r.question)
    res = B.bootstrap_data(model, tok, [r], cfg, cache_dir=tmp_path, model_id="tiny-random", seed=1)
    assert len(calls) == 1 and calls[0]["num_samples"] == [cfg.bootstrap.num_samples]
    assert (calls[0]["temperature"], calls[0]["top_p"]) == (0.9, 0.95) and len(calls[0]["prompts"]) == 1
    assert calls[0]["max_new_tokens"] == [cfg.bootstrap.max_new_tokens]  # one limit per prompt
    # the open-book prompt: cheat sheet with the article, generated by the base model
    assert "<p>Globex bought Acme.</p>" in tok.decode(calls[0]["prompts"][0])
    # argmax of the (independently computed) rewards among the valid candidates
    valid = [B.extract_thought(t) for t in VALID[:3]]
    rewards = B.score_thoughts(model, tok, r.question, "Globex", valid)
    best = valid[max(range(3), key=lambda i: rewards[i])]
    by_replica = {t["replica"]: t for t in res.thoughts}
    assert by_replica[0]["thought"] == best and not by_replica[0]["from_cache"]
    assert by_replica[1] == {**by_replica[1], "thought": "cached thought one two three", "from_cache": True}
    assert res.stats["from_cache"] == 1 and res.stats["selected"] == 2 and len(res.examples) == 2
    # second run: everything cached, generate must not be called at all
    monkeypatch.setattr(B, "generate", lambda *a, **k: pytest.fail("generate called for cached replicas"))
    again = B.bootstrap_data(model, tok, [r], cfg, cache_dir=tmp_path, model_id="tiny-random", seed=2)
    assert [t["thought"] for t in again.thoughts] == [best, "cached thought one two three"]
    assert again.examples == res.examples
    # SFT pair: closed-book prompt (no cheat sheet), completion = think block + answer + end-of-turn
    p_ids, c_ids = res.examples[0]
    assert "HIDDEN CONTEXT" not in tok.decode(p_ids, skip_special_tokens=False)
    assert c_ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(c_ids[:-1]) == completion_text(best, "Globex")


def test_invalid_replicas_resampled_then_skipped_never_abort(tiny, tmp_path, monkeypatch, caplog):
    model, tok = tiny
    cfg = load_hparams("tiny")  # max_resample_rounds = 1
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [["<think>nope</think>"], VALID[:1]], calls))
    res = B.bootstrap_data(model, tok, [req()], cfg, cache_dir=tmp_path, model_id="m", seed=0)
    assert [c["num_samples"] for c in calls] == [[8], [8]]  # both replicas failed round 1, both resampled
    assert res.stats["selected"] == 2 and res.stats["skipped_replicas"] == 0
    assert calls[0]["seed"] != calls[1]["seed"]

    calls.clear()
    monkeypatch.setattr(B, "generate", fake_generate(tok, [["<think>cheat sheet says Globex is it</think>"]], calls))
    with caplog.at_level(logging.WARNING):
        res = B.bootstrap_data(model, tok, [req(q="Who owns Acme now?")], cfg, cache_dir=tmp_path, model_id="m", seed=0)
    assert len(calls) == 1 + cfg.bootstrap.max_resample_rounds
    assert res.examples == [] and res.stats["skipped_replicas"] == 2
    # warnings only: an earlier test may have left the root logger at INFO, and round one logs at INFO
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("no valid candidate" in m for m in warned) == 2


def test_candidate_seed_follows_the_edit_not_the_case(tiny, monkeypatch):
    """The same edit in two cases (two units, two torchrun ranks) with a cold cache draws the same
    candidates: the sampling seed comes from what the cache is keyed by, not from the unit's seed."""
    model, tok = tiny
    cfg = load_hparams("tiny")
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [VALID[:1]], calls))
    B.bootstrap_data(model, tok, [req()], cfg, cache_dir=None, model_id="m", seed=1)
    B.bootstrap_data(model, tok, [req()], cfg, cache_dir=None, model_id="m", seed=2)
    B.bootstrap_data(model, tok, [req(q="Who owns Acme now?")], cfg, cache_dir=None, model_id="m", seed=1)
    assert calls[0]["seed"] == calls[1]["seed"] != calls[2]["seed"]


def test_a_cases_edits_share_one_first_round_and_draw_what_each_alone_draws(tiny, tmp_path, monkeypatch):
    """All edits' first sampling rounds go into one generate call (a prompt, a sample count and a seed per
    edit, the cached replicas left out), and with the real sampler each edit's candidates equal those it
    gets when bootstrapped alone: batching changes speed, not candidates."""
    model, tok = tiny
    cfg = load_hparams("tiny")  # 2 replicas x 4 candidates
    reqs = [req(), req(q="Who runs Acme?"), req(q="Where is Acme based?")]
    C.cache_put(tmp_path, C.cache_key("m", reqs[1].question, 0, reqs[1].article), z_star="cached thought one two",
                new_answer="Globex", old_answer="Initech", question=reqs[1].question)
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [VALID], calls))
    B.bootstrap_data(model, tok, reqs, cfg, cache_dir=tmp_path, model_id="m", seed=0)
    assert len(calls) == 1 and len(calls[0]["prompts"]) == 3
    assert calls[0]["num_samples"] == [8, 4, 8]  # edit 1: one replica cached
    assert calls[0]["seed"] == [B.causal_seed(r, "m", 0) for r in reqs]
    monkeypatch.undo()

    seen = {}
    pick = B._pick_replicas

    def spy(texts, missing, selected, scorer, r, *a):
        seen.setdefault(r.question, []).append(list(texts))
        return pick(texts, missing, selected, scorer, r, *a)

    monkeypatch.setattr(B, "_pick_replicas", spy)
    B.bootstrap_data(model, tok, reqs, cfg, cache_dir=None, model_id="m", seed=0)
    together, seen = seen, {}
    for r in reqs:
        B.bootstrap_data(model, tok, [r], cfg, cache_dir=None, model_id="m", seed=0)
    assert together == seen and len(seen) == 3 and all(len(t[0]) == 8 for t in seen.values())
    assert len({x for t in seen.values() for x in t[0]}) > 12  # distinct samples, not empty strings


def test_an_edits_replicas_are_scored_in_one_call_and_each_picks_its_own_best(tiny, monkeypatch):
    """One scoring call per edit and round, over every replica's valid thoughts; each replica still gets
    the best of its own candidates, as choose_thought on its chunk alone gives."""
    model, tok = tiny
    cfg = load_hparams("tiny")  # 2 replicas x 4 candidates
    other = ["<think>\nOld fact: Initech. Reason for change: Globex paid cash for every share. Updated fact: "
             "Globex.\n</think>", "<think>bad</think>",
             "<think>Globex took over Acme after a long court fight</think> The answer now is Globex.", ""]
    texts = VALID + other  # replica 0 gets VALID, replica 1 the others
    monkeypatch.setattr(B, "generate", fake_generate(tok, [texts], []))
    calls = []
    real = B.score_thoughts
    monkeypatch.setattr(B, "score_thoughts",
                        lambda m, t, q, a, ts, **k: calls.append(list(ts)) or real(m, t, q, a, ts, **k))
    res = B.bootstrap_data(model, tok, [req()], cfg, cache_dir=None, model_id="m", seed=0)
    assert len(calls) == 1 and len(calls[0]) == 5  # 3 valid thoughts of replica 0, 2 of replica 1
    score = lambda ts: real(model, tok, req().question, "Globex", ts)  # noqa: E731
    want = [B.choose_thought(texts[:4], score), B.choose_thought(texts[4:], score)]
    assert [t["thought"] for t in sorted(res.thoughts, key=lambda t: t["replica"])] == want
    assert want[0] in calls[0][:3] and want[1] in calls[0][3:] and res.stats["valid_candidates"] == 5


def test_edits_with_different_token_budgets_still_share_one_call(tiny, monkeypatch):
    """Where model.max_seq_len cuts the budget, prompts of different lengths get different budgets, each
    passed as its own limit in the one generate call."""
    model, tok = tiny
    cfg = load_hparams("tiny")
    reqs = [req(), req(q="Who runs the company Acme these days, after all?")]
    lens = [len(T.chat_ids(tok, B.causal_plan(r, cfg, None, "m", {"from_cache": 0}).msgs)) for r in reqs]
    assert lens[0] != lens[1]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=max(lens) + 10))
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [VALID], calls))
    B.bootstrap_data(model, tok, reqs, cfg, cache_dir=None, model_id="m", seed=0)
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == [max(lens) + 10 - n for n in lens]


def test_noncausal_no_filter_no_reward_and_padding(tiny, monkeypatch):
    model, tok = tiny
    cfg = load_hparams("tiny")
    cfg = dataclasses.replace(cfg, editing_mode="noncausal")
    calls = []
    monkeypatch.setattr(B, "generate", fake_generate(tok, [["<think>Updated answer: Globex</think>", ""]], calls))
    monkeypatch.setattr(B, "score_thoughts", lambda *a, **k: pytest.fail("noncausal mode scores nothing"))
    res = B.bootstrap_data(model, tok, [req(article=None)], cfg, cache_dir=None, model_id="m", seed=0)
    assert calls[0]["num_samples"] == [max(cfg.bootstrap.num_samples, cfg.bootstrap.replica_times)]
    prompt = tok.decode(calls[0]["prompts"][0])
    assert "Previous Answer (for disambiguation only)**: Initech" in prompt and "Reference Article" not in prompt
    assert [t["thought"] for t in res.thoughts] == ["Updated answer: Globex"] * 2  # short thought kept (no filter)


def test_derive_seed_is_stable():
    assert T.derive_seed("unit", "case-3") == T.derive_seed("unit", "case-3") != T.derive_seed("unit", "case-4")
    assert 0 <= T.derive_seed(1, 2, "x") < 2**31

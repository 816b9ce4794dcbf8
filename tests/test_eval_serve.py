"""eval.serve: the OpenAI-compatible server over our decoder and sampler answers chat requests like a
direct model.generate call, rejects bad requests, and the judge runs end to end against it."""
import json
import threading

import pytest
import requests
import torch

from eval import judge as J
from eval.chat import ChatClient, ChatError
from eval.serve import make_server
from model import ModelConfig, Transformer, generate, load_model, load_tokenizer

VERDICT = "<verification>PASS</verification>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


class Running:
    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_serve_matches_direct_generate_and_rejects_bad_requests(tok):
    model = load_model("tiny-random", device="cpu")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city in France."}]
    ids = tok.encode(tok.chat(msgs, add_generation_prompt=True))
    (ref,) = generate(model, [ids], max_new_tokens=7, temperature=0.0, stop_ids=tok.eos_ids)
    expected = tok.decode(ref.tokens, skip_special_tokens=True)
    with Running(make_server(model, tok, model_name="tiny-random", max_new_tokens=7)) as srv:
        client = ChatClient(srv.base_url, "tiny-random", timeout=60, max_retries=0)
        assert client.complete(msgs) == expected
        assert client.complete(msgs, max_tokens=3) == tok.decode(ref.tokens[:3], skip_special_tokens=True)
        body = requests.post(srv.base_url + "/chat/completions", json={"model": "x", "messages": msgs}, timeout=60).json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["prompt_tokens"] == len(ids)
        assert body["usage"]["completion_tokens"] == 7
        models = requests.get(srv.base_url + "/models", timeout=10).json()
        assert models["data"][0]["id"] == "tiny-random"
        for bad in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": msgs, "stream": True}):
            with pytest.raises(ChatError) as ei:
                client.complete(**{k: v for k, v in bad.items() if k != "messages"}, messages=bad["messages"])
            assert ei.value.status == 400 and not ei.value.retryable
        r = requests.post(srv.base_url + "/chat/completions", data=b"{not json", timeout=10)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def segment_distinct(tok, text, avoid):
    """Token ids whose decoded pieces concatenate to `text`, no id used twice or in `avoid`."""
    pieces = {}
    for i in range(tok.vocab_size):
        s = tok.decode([i], skip_special_tokens=False)
        if s and s in text:
            pieces.setdefault(s, []).append(i)

    def dfs(pos, used):
        if pos == len(text):
            return []
        for s in sorted(pieces, key=len, reverse=True):
            if text.startswith(s, pos):
                for i in pieces[s]:
                    if i not in used and i not in avoid:
                        rest = dfs(pos + len(s), used | {i})
                        if rest is not None:
                            return [i] + rest
        return None
    return dfs(0, frozenset())


def verdict_model(tok, start_id):
    """A 1-layer model whose blocks add nothing, so the next token depends only on the current one (a
    bigram table in embed/lm_head). After `start_id` it greedily writes "<verification>" and then loops
    over "PASS</verification>" (">" is one token, so a bigram cannot stop after its second use): the
    reply holds exactly one complete verdict tag and ends by length."""
    gt = tok.encode(">")
    assert len(gt) == 1
    head_ids = segment_distinct(tok, "<verification", {start_id, *gt, *tok.eos_ids})
    loop_ids = segment_distinct(tok, "PASS</verification", {start_id, *gt, *tok.eos_ids, *head_ids})
    chain = [start_id] + head_ids + gt + loop_ids + gt + loop_ids[:1]  # ... > PASS</verification > PASS ...
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=16, tie_word_embeddings=False,
                      eos_token_ids=list(tok.eos_ids))
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        emb, head = m.model.embed_tokens.weight, m.lm_head.weight
        for i, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            if emb[cur].any():  # ">" appears twice in the chain with the same successor
                continue
            emb[cur, i] = 1.0
            head[nxt, i] = 10.0
    return m.requires_grad_(False).eval()


def test_judge_end_to_end_against_local_server(tmp_path, tok):
    start = tok.encode(tok.chat([{"role": "user", "content": "x"}], add_generation_prompt=True))[-1]
    model = verdict_model(tok, start)

    def item(p):
        return {"q": p, "prompt": f"Now, {p} Let's think step by step.", "ref": ["Paris"], "pred": "It is Lyon."}
    recs = [{"case_id": c, "requested_rewrite": [], "time": 0.0,
             "post": {"hop_wise_pred": [[item(f"h{c}{h}{s}") for s in range(3)] for h in range(2)],
                      "accuracy_pred": [item(f"m{c}{s}") for s in range(3)]}} for c in range(2)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(recs))
    server = make_server(model, tok, model_name="verdict", max_new_tokens=32)
    with Running(server) as srv:
        backend = J.Backend(ChatClient(srv.base_url, "verdict", timeout=60, max_retries=1), 2)
        s = J.run_judge(run / "metrics.json", backend, progress=False)
    judged = json.loads((run / "judge" / "metrics.judged.json").read_text())
    verdicts = [d["judge"] for r in judged for h in r["post"]["hop_wise_pred"] for d in h]
    verdicts += [d["judge"] for r in judged for d in r["post"]["accuracy_pred"]]
    assert len(verdicts) == 18
    assert all(v["result"] == "PASS" and v["method"] == "llm" and v["raw"].startswith(VERDICT + "PASS</")
               for v in verdicts)
    # the model says PASS to everything (even "Lyon" for gold "Paris"): the summary shows what it said
    assert s["judge"] == "llm:verdict" and s["items"] == {"total": 18, "PASS": 18, "FAIL": 0, "ERROR": 0, "asserts_old": 0}
    assert s["overall_hop_wise_average"] == 1.0 and s["accuracy_averages"]["any_right_accuracy"] == 1.0


def test_concurrent_greedy_requests_share_generate_calls(tok, monkeypatch):
    """Requests that wait together go through one generate call, each answered as if alone (its own
    max_tokens and finish reason)."""
    import time

    import model as model_pkg

    model = load_model("tiny-random", device="cpu")
    prompts = [[{"role": "user", "content": f"Question number {i}: name a river."}] for i in range(10)]
    limits = [3 + i % 4 for i in range(10)]
    want = []
    for msgs, n in zip(prompts, limits):
        (c,) = generate(model, [tok.encode(tok.chat(msgs))], max_new_tokens=n, temperature=0.0, stop_ids=tok.eos_ids)
        want.append((tok.decode(c.tokens, skip_special_tokens=True), c.finish_reason))
    sizes = []

    def slow_generate(m, ps, **kw):  # the first call holds the model while the others queue up
        sizes.append(len(ps))
        if len(sizes) == 1:
            time.sleep(0.5)
        return generate(m, ps, **kw)

    monkeypatch.setattr(model_pkg, "generate", slow_generate)
    got = [None] * 10
    with Running(make_server(model, tok, model_name="tiny-random", max_new_tokens=8)) as srv:
        def ask(i):
            r = requests.post(srv.base_url + "/chat/completions",
                              json={"messages": prompts[i], "max_tokens": limits[i], "temperature": 0}, timeout=60)
            ch = r.json()["choices"][0]
            got[i] = (ch["message"]["content"], ch["finish_reason"])
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
        threads[0].start()
        time.sleep(0.1)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert got == want
    assert sum(sizes) == 10 and max(sizes) > 1  # the nine that waited were batched


def naive_guided(model, prompt, choices, end_id):
    """Reference for guided_choice: decode token by token with a full forward of the whole sequence,
    allowing only tokens that keep the text on some choice (end_id once a choice is complete)."""
    seqs = [c + [end_id] for c in choices]
    out = []
    while True:
        live = [s for s in seqs if s[:len(out)] == out]
        if len(live) == 1 and len(out) == len(live[0]):
            return seqs.index(live[0])
        allowed = sorted({s[len(out)] for s in live})
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out]))[0, -1]
        out.append(allowed[int(logits[allowed].argmax())])


def test_guided_choice_matches_naive_constrained_greedy(tok):
    from eval.prompts import SELF_REFUTE_CHOICES
    from eval.serve import PrefixKV, guided_choice

    model = load_model("tiny-random", device="cpu")
    end = tok.eos_ids[0]
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(5, tok.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    lists = [["PASS", "FAIL"], ["yes", "yes sir", "no"], ["<verification>PASS</verification>",
                                                            "<verification>FAIL</verification>"],
             list(SELF_REFUTE_CHOICES)]  # eight verdicts: three branch points, forced runs between them
    shared = rand(30)  # like a judge's fixed instructions: the kept keys/values serve the next prompt
    prompts = [rand(int(torch.randint(3, 40, (1,), generator=gen))) for _ in range(6)]
    prompts += [shared + rand(int(torch.randint(1, 20, (1,), generator=gen))) for _ in range(6)]
    prompts += [shared, shared[:12], shared + rand(2100)]  # the same, a prefix of the last one, a longer cache
    kv, picked = PrefixKV(), set()
    for trial, prompt in enumerate(prompts):
        for texts in lists:
            enc = [tok.encode(t) for t in texts]
            want = naive_guided(model, prompt, enc, end)
            assert guided_choice(model, prompt, enc, end) == want, (trial, texts)
            assert guided_choice(model, prompt, enc, end, kv) == want, (trial, texts, "reused prefix")
            picked.add((tuple(texts), want))
    assert kv.cache.length >= 2100 + len(shared)
    fed = []  # what each forward gets: after a race on shared + A, one on shared + B prefills only B
    real_run = model.run
    model.run = lambda ids, *a, **k: fed.append(ids.shape[1]) or real_run(ids, *a, **k)
    a, b = shared + rand(5), shared + rand(7)
    guided_choice(model, a, [tok.encode("PASS"), tok.encode("FAIL")], end, kv)
    fed.clear()
    guided_choice(model, b, [tok.encode("PASS"), tok.encode("FAIL")], end, kv)
    assert fed[0] <= 7 and sum(fed) < len(shared)
    assert len({k for t, k in picked if t == tuple(lists[1])}) > 1  # the race is decided by the model, not fixed


def test_serve_guided_choice_requests_and_guided_judge(tmp_path, tok):
    model = load_model("tiny-random", device="cpu")
    msgs = [{"role": "user", "content": "Is Paris in France?"}]
    from eval.prompts import SELF_REFUTE_CHOICES, VERDICT_CHOICES
    from eval.serve import guided_choice
    ids = tok.encode(tok.chat(msgs, add_generation_prompt=True))
    want = VERDICT_CHOICES[guided_choice(model, ids, [tok.encode(c) for c in VERDICT_CHOICES], tok.eos_ids[0])]
    with Running(make_server(model, tok, model_name="tiny-random", max_new_tokens=8)) as srv:
        client = ChatClient(srv.base_url, "tiny-random", timeout=60, max_retries=0)
        assert client.complete(msgs, guided_choice=VERDICT_CHOICES) == want
        for bad in ([], ["a", "a"], ["a", ""], "PASS"):
            with pytest.raises(ChatError, match="guided_choice") as ei:
                client.complete(msgs, guided_choice=bad)
            assert ei.value.status == 400
        with pytest.raises(ChatError, match="temperature 0"):
            client.complete(msgs, guided_choice=["a", "b"], temperature=0.7)

        # the random tiny model never writes a verdict tag on its own; guided, every item gets one
        def item(p):
            return {"q": p, "prompt": f"Now, {p} Let's think step by step.", "ref": ["Paris"], "pred": "It is Paris."}
        rw = [{"prompt": "{} is in", "subject": "Paris", "target_new": "Lyon", "target_true": "France",
               "question": "Where is Paris?"}]
        recs = [{"case_id": c, "requested_rewrite": rw, "time": 0.0,
                 "post": {"hop_wise_pred": [[item(f"h{c}{s}") for s in range(2)]],
                          "accuracy_pred": [item(f"m{c}{s}") for s in range(2)],
                          "conflict_probe": [{"prompt": "Now, where? Let's think step by step.", "ref": ["Paris"],
                                              "pred": "Paris. No, that is wrong. The answer is Lyon."}]}}
                for c in range(2)]
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(recs))
        backend = J.Backend(client, 2, guided=True)
        s = J.run_judge(run / "metrics.json", backend, progress=False)
        assert s["judge"] == "llm:tiny-random:guided"
        assert s["items"]["ERROR"] == 0 and s["items"]["PASS"] + s["items"]["FAIL"] == s["items"]["total"] == 8
        from eval.analyze import run_analyze
        res = run_analyze(run / "metrics.json", backend, progress=False)
        rows = [json.loads(x) for x in (run / "analysis" / "pred_self_refute_analysis_llm_judge_ckpt.jsonl").read_text().splitlines()]
        assert rows and all(r["result"] == "OK" and r["method"] == "llm" and r["raw"] in SELF_REFUTE_CHOICES for r in rows)
        assert res["judge"] == "llm:tiny-random:guided"

"""The rollout engine: cached decoding against full recomputation, batching, samples, sampling law, seeds."""
import importlib
import math

import pytest
import torch

from hf_tiny import make_hf_model
from model import generate, load_model

G = importlib.import_module("model.generate")  # the module (the package re-exports the function by that name)


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    return hf, load_model(path, device="cpu")


def ragged(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (L,), generator=g).tolist() for L in (5, 17, 9, 1, 12, 30)[:n]]


def full_recompute_greedy(model, prompt, n):
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
        lp = model(x).log_softmax(-1)[0, len(prompt) - 1:-1].gather(1, x[0, len(prompt):, None]).squeeze(1)
    return x[0, len(prompt):].tolist(), lp


def test_cached_greedy_equals_full_recompute(pair):
    _, m = pair
    for p in ragged(3):
        want, want_lp = full_recompute_greedy(m, p, 24)
        (c,) = generate(m, [p], max_new_tokens=24, temperature=0, stop_ids=[])
        assert c.tokens == want and c.finish_reason == "length"
        assert torch.allclose(torch.tensor(c.logprobs), want_lp, atol=1e-4)


def test_alone_equals_in_ragged_batch(pair):
    _, m = pair
    prompts = ragged(6)
    batch = generate(m, prompts, max_new_tokens=20, temperature=0, stop_ids=[])
    for i, p in enumerate(prompts):
        (alone,) = generate(m, [p], max_new_tokens=20, temperature=0, stop_ids=[])
        assert batch[i].prompt_index == i and batch[i].tokens == alone.tokens


def test_num_samples_copies_equal_separate_prompts(pair):
    _, m = pair
    prompts = ragged(3)
    multi = generate(m, prompts, max_new_tokens=16, temperature=0, num_samples=3, stop_ids=[])
    sep = generate(m, [p for p in prompts for _ in range(3)], max_new_tokens=16, temperature=0, stop_ids=[])
    assert [(c.prompt_index, c.sample_index) for c in multi] == [(i, s) for i in range(3) for s in range(3)]
    assert [c.tokens for c in multi] == [c.tokens for c in sep]


def test_stop_ids_and_compaction(pair, monkeypatch):
    """Rows stop at different steps; compaction (every 2 steps here) must not change any row's output."""
    _, m = pair
    prompts = ragged(6, seed=5)
    ref = [full_recompute_greedy(m, p, 20)[0] for p in prompts]
    stop = ref[0][3]  # a token that some rows produce early
    monkeypatch.setattr(G, "SYNC_EVERY", 2)
    out = generate(m, prompts, max_new_tokens=20, temperature=0, stop_ids=[stop])
    for c, r in zip(out, ref):
        want = r[: r.index(stop) + 1] if stop in r else r
        assert c.tokens == want
        assert c.finish_reason == ("stop" if stop in r else "length")
    assert out[0].finish_reason == "stop" and len(out[0].tokens) <= 4


def test_growing_attention_window(pair, monkeypatch):
    """The decode attends over the filled slots rounded up to ATTEND_STEP: with a step of 8 the window
    grows every few tokens (and meets compaction); every row must still equal full recomputation."""
    _, m = pair
    monkeypatch.setattr(G, "ATTEND_STEP", 8)
    monkeypatch.setattr(G, "SYNC_EVERY", 3)
    prompts = ragged(6, seed=7)
    ref = [full_recompute_greedy(m, p, 22) for p in prompts]
    stop = ref[1][0][5]
    out = generate(m, prompts, max_new_tokens=22, temperature=0, stop_ids=[stop])
    for c, (toks, lp) in zip(out, ref):
        want = toks[: toks.index(stop) + 1] if stop in toks else toks
        assert c.tokens == want
        assert torch.allclose(torch.tensor(c.logprobs), lp[: len(want)], atol=1e-4)


def spy_shared(monkeypatch):
    """Record the `shared` flag of every batch generate() runs."""
    flags, real = [], G._run_batch

    def run(model, prompts_, rows, *a):
        flags.append(a[-1])
        return real(model, prompts_, rows, *a)

    monkeypatch.setattr(G, "_run_batch", run)
    return flags


def test_shared_prefix_rows_equal_full_recompute(pair, monkeypatch):
    """Few prompts sampled many times keep each prompt's keys/values once, as a prefix all its rows attend
    to (ragged prompts side by side, left-padded). Every row must still equal full recomputation, also
    with the window growing, rows stopping and compaction moving rows under the fixed prefix."""
    _, m = pair
    monkeypatch.setattr(G, "ATTEND_STEP", 8)
    monkeypatch.setattr(G, "SYNC_EVERY", 3)
    flags = spy_shared(monkeypatch)
    prompts = ragged(3, seed=9)  # lengths 5, 17, 9
    ref = [full_recompute_greedy(m, p, 22) for p in prompts]
    stop = ref[2][0][4]
    out = generate(m, prompts, max_new_tokens=22, temperature=0, num_samples=3, stop_ids=[stop])
    assert flags == [True]
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, s) for i in range(3) for s in range(3)]
    for c in out:
        toks, lp = ref[c.prompt_index]
        want = toks[: toks.index(stop) + 1] if stop in toks else toks
        assert c.tokens == want
        assert torch.allclose(torch.tensor(c.logprobs), lp[: len(want)], atol=1e-4)


def test_shared_prefix_samples_like_per_row_caches(pair, monkeypatch):
    """The same seed draws the same tokens with a shared prefix as with the prompt copied into every row
    (the two differ only in float rounding); many prompts or one sample each use per-row caches."""
    _, m = pair
    prompts = ragged(4, seed=2)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=5, stop_ids=[], seed=3)
    flags = spy_shared(monkeypatch)
    shared = generate(m, prompts, **kw)
    monkeypatch.setattr(G, "SHARED_PREFIX_MAX_PROMPTS", 3)  # 4 prompts: now above the limit
    per_row = generate(m, prompts, **kw)
    generate(m, prompts[:2], max_new_tokens=4, temperature=0, stop_ids=[])  # one sample per prompt
    assert flags == [True, False, False]
    assert [c.tokens for c in shared] == [c.tokens for c in per_row]
    for a, b in zip(shared, per_row):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_attend_with_prefix_equals_attention_over_concatenated_keys():
    """The shared-prefix decode attention against plain softmax attention over [prefix | own] keys,
    expanded to every row and query head (float64 reference; the scores are fp32 inside), with a row
    that sees none of the prefix and one that sees none of its own slots (each part's -inf maximum)."""
    g = torch.Generator().manual_seed(0)
    B, kv, grp, D, L, S = 5, 2, 3, 8, 7, 4
    q = torch.randn(B, kv * grp, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(kv, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, 1, 1, L + S, generator=g) > 0.3
    mask[:, ..., -1] = True
    mask[0, ..., :L] = False  # row 0: own slots only
    mask[1, ..., L:] = False  # row 1: prefix only
    mask[1, ..., 0] = True
    from model.decoder import attend

    got = attend(q, k, v, mask, (pk, pv))
    K = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2).repeat_interleave(grp, 1)
    V = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2).repeat_interleave(grp, 1)
    w = (q @ K.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(got, w @ V, rtol=0, atol=1e-6)


def test_seed_reproducible_and_distinct(pair):
    _, m = pair
    prompts = ragged(3)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, num_samples=2, stop_ids=[])
    a = generate(m, prompts, seed=7, **kw)
    b = generate(m, prompts, seed=7, **kw)
    c = generate(m, prompts, seed=8, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_oom_splits_batch_and_carries_on(pair, monkeypatch):
    _, m = pair
    prompts = ragged(6)
    want = generate(m, prompts, max_new_tokens=8, temperature=0, stop_ids=[])
    real = G._run_batch
    sizes = []

    def flaky(model, prompts_, rows, *a):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(model, prompts_, rows, *a)

    monkeypatch.setattr(G, "_run_batch", flaky)
    got = generate(m, prompts, max_new_tokens=8, temperature=0, stop_ids=[])
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert max(sizes) == 6 and sizes[-1] <= 2


def hf_processed(logits, input_ids, temperature, top_k, top_p, penalty):
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    x = logits.clone()
    if penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, x)
    x = TemperatureLogitsWarper(temperature)(input_ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(input_ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(input_ids, x)
    return x


@pytest.mark.parametrize("T,k,p,pen", [(0.7, 0, 1.0, 1.3), (1.0, 20, 1.0, 1.0), (1.0, 0, 0.8, 1.0),
                                       (1.3, 15, 0.9, 1.1)])
def test_processors_match_transformers(T, k, p, pen):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 97, generator=g) * 3
    ids = torch.randint(0, 97, (4, 12), generator=g)
    seen = torch.zeros(4, 97, dtype=torch.bool).scatter_(1, ids, True)
    ours = G.process_logits(logits, G.SamplingParams(T, p, k, pen), seen)
    if p < 1:  # the nucleus, decided token by token as the sampler decides it for its race candidates
        keep = G.nucleus_keep(ours.softmax(-1), torch.arange(97).expand(4, 97), p)
        ours = ours.masked_fill(~keep, float("-inf"))
    ref = hf_processed(logits, ids, T, k, p, pen)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], rtol=1e-6, atol=1e-6)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.8, 0, 0.85), (1.2, 12, 1.0), (1.0, 10, 0.9)])
def test_sampling_frequencies_match_softmax(pair, T, k, p):
    hf, m = pair
    prompt = ragged(1, seed=3)[0]
    N = 6000
    out = generate(m, [prompt], max_new_tokens=1, temperature=T, top_k=k, top_p=p, num_samples=N, seed=11,
                   stop_ids=[])
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in out]), minlength=97).double()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[:, -1].double()
    probs = hf_processed(logits, torch.tensor([prompt]), T, k, p, 1.0).softmax(-1)[0]
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k / nucleus support
    # Pool the rare tokens so every cell expects at least 5 draws.
    exp = probs * N
    big = exp >= 5
    obs_cells = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_cells = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_cells > 0
    chi2 = (((obs_cells - exp_cells) ** 2) / exp_cells)[keep].sum().item()
    df = int(keep.sum()) - 1
    assert df >= 3, "the test distribution is too peaked to say anything"
    assert chi2 < chi2_critical(df), (chi2, df)


def test_nucleus_keep_cuda_form_equals_cpu_form(monkeypatch):
    """The masked-sum form used on CUDA without Triton and the bucket form used on CPU decide the same
    memberships (bench/check_gpu.py compares the Triton kernel with the masked sums on a GPU)."""
    monkeypatch.setattr(G, "triton", None)
    g = torch.Generator().manual_seed(4)
    probs = (torch.randn(8, 300, generator=g) * 2).softmax(-1)
    cand = torch.stack([torch.randperm(300, generator=g)[:16] for _ in range(8)])
    cpu = G.nucleus_keep(probs, cand, 0.7)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert torch.equal(G.nucleus_keep(probs, cand, 0.7), cpu)
    assert cpu.any() and not cpu.all()


def test_generate_with_merged_lora_samples_the_adapter_and_restores_the_base(pair, monkeypatch):
    """With CODE_EDIT_MERGE_LORA=1 on CUDA an active adapter is merged for sampling: the same greedy tokens as the unmerged adapter
    (fp32), the base weights bit for bit afterwards, and the adapter still trainable. A switched-off
    adapter is not merged (the teacher samples the base)."""
    from model.lora import LoraConfig, add_lora, disabled, lora_modules, remove
    _, m = pair
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = add_lora(m, LoraConfig(rank=4, alpha=8, dropout=0.0, seed=1))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    try:
        prompts = ragged(3)
        unmerged = generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])
        with disabled(m):
            base = generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])
        calls = []
        real = G._run_rows

        def spy(model, *a):  # what the sampling sees: every adapter module merged, or none
            calls.append([x.merged for _, x in lora_modules(model)])
            return real(model, *a)

        monkeypatch.setattr(G, "_merge_lora", lambda device: True)
        monkeypatch.setattr(G, "_run_rows", spy)
        merged = generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])
        with disabled(m):
            base_again = generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=[])
        assert [c.tokens for c in merged] == [c.tokens for c in unmerged] != [c.tokens for c in base]
        assert [c.tokens for c in base_again] == [c.tokens for c in base]
        n = len(lora_modules(m))
        assert calls == [[True] * n, [False] * n] and not any(x.merged for _, x in lora_modules(m))
        for c, u in zip(merged, unmerged):
            assert max(abs(a - b) for a, b in zip(c.logprobs, u.logprobs)) < 1e-4
        m.train()
        m(torch.tensor([prompts[0]])).sum().backward()  # the adapter trains after an in-place merge/unmerge
        assert all(p.grad is not None for p in params)
    finally:
        m.eval()
        remove(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_sampler_logits_are_fp32_products_of_bf16_weights():
    """The sampler's logits are the bf16 hidden states times the bf16 head accumulated and returned in
    fp32 (as the trainer's fused losses compute them), not a bf16 product cast up afterwards."""
    from model.load import tiny_random
    m = tiny_random(dtype=torch.bfloat16)
    h = torch.randn(5, m.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = h.double() @ m.lm_head.weight.double().T
    got = m.logits(h)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-4 < (m.lm_head(h).double() - want).abs().max()


def test_race_noise_is_exponential_and_uncorrelated():
    """The counter-based draws: Exp(1) moments and quantiles (a naive check against the closed form),
    no correlation between neighbouring tokens, rows or steps, and the same draws for the same key."""
    keys = G.row_keys([(11, i) for i in range(4)], [(i, s) for i in range(4) for s in range(8)], "cpu")
    e0 = G.race_noise(keys, torch.tensor(0), 5000)
    e1 = G.race_noise(keys, torch.tensor(1), 5000)
    x = e0.flatten().double()
    assert abs(x.mean() - 1) < 0.02 and abs(x.var() - 1) < 0.04
    for q in (0.1, 0.5, 0.9, 0.99):  # P(E <= -log(1 - q)) = q
        assert abs((x <= -math.log(1 - q)).double().mean() - q) < 0.01
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].abs()  # noqa: E731
    assert corr(e0[:, 1:], e0[:, :-1]) < 0.02 and corr(e0[1:], e0[:-1]) < 0.02 and corr(e0, e1) < 0.02
    assert torch.equal(G.race_noise(keys[5:7], torch.tensor(0), 5000), e0[5:7])
    assert len(set(keys.tolist())) == len(keys)


def test_samples_do_not_depend_on_batching(pair):
    """A row's draws depend on the seed, its prompt index and its sample index only: the same tokens when
    the rows are split into batches of 2, and when the other prompts of the call change."""
    _, m = pair
    prompts = ragged(4, seed=5)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3, stop_ids=[], seed=8)
    whole = generate(m, prompts, **kw)
    split = generate(m, prompts, max_batch=2, **kw)
    assert [c.tokens for c in whole] == [c.tokens for c in split]
    other = generate(m, [prompts[0], [41, 42, 43], prompts[2], prompts[3]], **kw)
    assert [c.tokens for c in other if c.prompt_index != 1] == [c.tokens for c in whole if c.prompt_index != 1]


def test_a_seed_per_prompt_samples_each_prompt_as_its_own_call(pair):
    """Prompts with their own seeds and sample counts in one call: each prompt's completions equal those
    of a call of its own with its seed (tokens; log-probs to fp32 rounding, the batch layouts differ)."""
    _, m = pair
    prompts = ragged(3, seed=6)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, stop_ids=[])
    together = generate(m, prompts, num_samples=[2, 4, 3], seed=[50, 51, 52], **kw)
    assert [(c.prompt_index, c.sample_index) for c in together] == [(0, 0), (0, 1)] + [(1, s) for s in range(4)] + \
        [(2, s) for s in range(3)]
    alone = [c for i, (n, sd) in enumerate(zip([2, 4, 3], [50, 51, 52]))
             for c in generate(m, [prompts[i]], num_samples=n, seed=sd, **kw)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    for a, b in zip(together, alone):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="seed needs one value per prompt"):
        generate(m, prompts, seed=[1, 2], **kw)
    with pytest.raises(ValueError, match="num_samples needs one count"):
        generate(m, prompts, num_samples=[1, -1, 2], **kw)


@pytest.mark.parametrize("samples", [1, 3])  # per-row caches; a shared prefix
def test_a_limit_per_prompt_samples_each_prompt_as_its_own_call(pair, samples, monkeypatch):
    """Prompts with their own token limits (and seeds) in one call: each prompt's completions equal those
    of a call of its own with its limit, a row stopping at its limit ("length") or earlier at a stop
    token, finished rows compacted away between; a limit of 0 gives empty completions."""
    monkeypatch.setattr(G, "SYNC_EVERY", 2)  # compaction (of the rows' limits too) every other step
    _, m = pair
    prompts = ragged(3, seed=7)
    limits, seeds = [3, 19, 0], [60, 61, 62]
    kw = dict(temperature=1.0, top_p=0.9, num_samples=samples)
    first = generate(m, prompts[1:2], max_new_tokens=19, stop_ids=[], seed=61, **kw)[0].tokens
    stop = first[6]  # the first row of prompt 1 stops there
    together = generate(m, prompts, max_new_tokens=limits, seed=seeds, stop_ids=[stop], **kw)
    alone = [c for p, n, sd in zip(prompts, limits, seeds)
             for c in generate(m, [p], max_new_tokens=n, seed=sd, stop_ids=[stop], **kw)]
    assert [(c.tokens, c.finish_reason) for c in together] == [(c.tokens, c.finish_reason) for c in alone]
    assert all(len(c.tokens) <= limits[c.prompt_index] for c in together)
    assert together[samples].tokens == first[:first.index(stop) + 1] and together[samples].finish_reason == "stop"
    assert any(c.finish_reason == "length" and len(c.tokens) == limits[c.prompt_index] for c in together)
    assert [c.tokens for c in together if c.prompt_index == 2] == [[]] * samples
    with pytest.raises(ValueError, match="max_new_tokens needs one limit per prompt"):
        generate(m, prompts, max_new_tokens=[1, 2], **kw)

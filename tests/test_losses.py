"""train.losses against naive references: full logits, dense log-softmax, explicit top-k union mask,
autograd for gradients (distill_loss), and torch's own cross_entropy (completion_ce_loss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses import completion_ce_loss, distill_loss, token_logprobs, weighted_ce_at

N, H, V = 37, 24, 1013


def naive_distill(hs, ht, W, w, direction, top_k, temperature=1.0, beta=0.5):
    """Textbook version: whole [N, V] logits, boolean mask for the union, masked log-softmax."""
    zs = (hs.float() @ W.float().T) / temperature
    zt = (ht.float() @ W.float().T).detach() / temperature
    mask = torch.ones_like(zs, dtype=torch.bool)
    if top_k:
        mask = torch.zeros_like(mask)
        mask.scatter_(1, zt.topk(top_k, dim=1).indices, True)
        mask.scatter_(1, zs.detach().topk(top_k, dim=1).indices, True)
    ls = zs.masked_fill(~mask, -math.inf).log_softmax(1)
    lt = zt.masked_fill(~mask, -math.inf).log_softmax(1)
    ps, pt = ls.exp(), lt.exp()  # exactly 0 off the support
    zero = torch.zeros_like(ls)
    ls, lt = torch.where(mask, ls, zero), torch.where(mask, lt, zero)  # no -inf, so no NaN gradients

    def kl(p, logp, logq):  # sum over the support of p (log p - log q)
        return (p * (logp - logq)).sum(1)

    if direction == "forward":
        d = kl(pt, lt, ls)
    elif direction == "reverse":
        d = kl(ps, ls, lt)
    else:
        m = beta * pt + (1 - beta) * ps
        lm = torch.where(mask, m, torch.ones_like(m)).log()
        d = beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)
    w = w.float()
    return (w * d).sum() / w.sum().clamp_min(1e-8)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_inputs(seed=0, dtype=torch.float32, n=N):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, H, generator=g) * 1.5
    ht = hs + torch.randn(n, H, generator=g)  # related but different distributions
    W = torch.randn(V, H, generator=g) * 0.5
    w = torch.rand(n, generator=g)
    w[::5] = 0.0
    return hs.to(dtype), ht.to(dtype), W.to(dtype), w


@pytest.mark.parametrize("top_k", [0, 24])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_distill_matches_naive_fp32(direction, top_k):
    hs, ht, W, w = make_inputs()
    a = hs.clone().requires_grad_()
    loss = distill_loss(a, ht, W, w, direction=direction, top_k=top_k, chunk_size=16)
    loss.backward()
    b = hs.clone().requires_grad_()
    ref = naive_distill(b, ht, W, w, direction, top_k)
    ref.backward()
    assert ref.item() > 1e-2  # the comparison is not between two near-zero numbers
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5
    assert rel_err(a.grad, b.grad) <= 1e-5
    assert torch.all(a.grad[::5] == 0)  # zero-weight rows get no gradient
    assert loss.dtype == torch.float32 and loss.dim() == 0


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_temperature_beta_and_chunking(direction):
    hs, ht, W, w = make_inputs(seed=1)
    grads, values = [], []
    for chunk in (1, 7, 16, 1000):
        a = hs.clone().requires_grad_()
        loss = distill_loss(a, ht, W, w, direction=direction, top_k=24, temperature=1.7, beta=0.3,
                            chunk_size=chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append(a.grad)
    b = hs.clone().requires_grad_()
    ref = naive_distill(b, ht, W, w, direction, 24, temperature=1.7, beta=0.3)
    ref.backward()
    for v, gr in zip(values, grads):
        assert rel_err(v, ref.detach()) <= 1e-5
        assert rel_err(gr, b.grad) <= 1e-5
    # Temperature changes the answer (so the comparison above exercises it).
    assert abs(distill_loss(hs, ht, W, w, direction=direction).item() - ref.item()) > 1e-3


def test_top_k_union_differs_from_full_and_large_k_is_full():
    hs, ht, W, w = make_inputs(seed=2)
    full = distill_loss(hs, ht, W, w, top_k=0)
    assert abs(distill_loss(hs, ht, W, w, top_k=24).item() - full.item()) > 1e-3
    assert rel_err(distill_loss(hs, ht, W, w, top_k=V + 5), full) <= 1e-5


def test_jsd_half_is_symmetric_and_same_distributions_give_zero():
    hs, ht, W, w = make_inputs(seed=3)
    ab = distill_loss(hs, ht, W, w, direction="jsd", top_k=0)
    ba = distill_loss(ht, hs, W, w, direction="jsd", top_k=0)
    assert rel_err(ab, ba) <= 1e-5 and ab.item() > 1e-3
    assert ab.item() <= math.log(2) + 1e-6  # JSD with beta = 1/2 is bounded by log 2
    for direction in ("forward", "reverse", "jsd"):
        a = hs.clone().requires_grad_()
        loss = distill_loss(a, hs, W, w, direction=direction, top_k=24)
        loss.backward()
        assert abs(loss.item()) < 1e-6
        assert a.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("top_k", [0, 24])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_distill_bf16_inputs(direction, top_k):
    hs, ht, W, w = make_inputs(seed=4, dtype=torch.bfloat16)
    a = hs.clone().requires_grad_()
    loss = distill_loss(a, ht, W, w, direction=direction, top_k=top_k, chunk_size=16)
    loss.backward()
    assert a.grad.dtype == torch.bfloat16
    b = hs.detach().float().clone().requires_grad_()  # the same (bf16-representable) values in fp32
    ref = naive_distill(b, ht.float(), W.float(), w, direction, top_k)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 2e-2
    assert rel_err(a.grad, b.grad) <= 2e-2


def test_zero_weights_and_empty_batch():
    hs, ht, W, _ = make_inputs(seed=5)
    hs[3] = float("nan")  # a zero-weight row (e.g. padding) must not poison the result
    for direction in ("forward", "reverse", "jsd"):
        for top_k in (0, 24):
            a = hs.clone().requires_grad_()
            loss = distill_loss(a, ht, W, torch.zeros(N), direction=direction, top_k=top_k)
            loss.backward()
            assert loss.item() == 0.0
            assert torch.equal(a.grad, torch.zeros_like(a.grad))
    w = torch.ones(N)
    w[3] = 0.0
    a = hs.clone().requires_grad_()
    loss = distill_loss(a, ht, W, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    e = torch.zeros(0, H, requires_grad=True)
    loss = distill_loss(e, torch.zeros(0, H), W, torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, H)


def test_grad_scales_with_upstream_and_no_grad_for_teacher_or_head():
    hs, ht, W, w = make_inputs(seed=6)
    a = hs.clone().requires_grad_()
    t = ht.clone().requires_grad_()
    head = W.clone().requires_grad_()
    (3.0 * distill_loss(a, t, head, w, direction="reverse", chunk_size=8)).backward()
    b = hs.clone().requires_grad_()
    (3.0 * naive_distill(b, ht, W, w, "reverse", 24)).backward()
    assert rel_err(a.grad, b.grad) <= 1e-5
    assert t.grad is None and head.grad is None
    with torch.no_grad():  # evaluation only: no gradient buffer, same value
        assert rel_err(distill_loss(a, ht, W, w, direction="reverse"), naive_distill(hs, ht, W, w, "reverse", 24)) <= 1e-5


def test_distill_rejects_bad_input():
    hs, ht, W, w = make_inputs(seed=7)
    with pytest.raises(ValueError, match="direction"):
        distill_loss(hs, ht, W, w, direction="kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(hs, ht, W, w, direction="jsd", beta=1.0)
    with pytest.raises(ValueError, match="teacher_hidden"):
        distill_loss(hs, ht[:-1], W, w)
    with pytest.raises(ValueError, match="student_hidden"):
        distill_loss(hs[:, :-1], ht[:, :-1], W, w)
    with pytest.raises(ValueError, match="token_weights"):
        distill_loss(hs, ht, W, w[:-1])
    with pytest.raises(ValueError, match="token_weights"):
        distill_loss(hs, ht, W, -w)
    with pytest.raises(ValueError, match="top_k"):
        distill_loss(hs, ht, W, w, top_k=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_completion_ce_matches_cross_entropy(dtype, tol):
    hs, _, W, _ = make_inputs(seed=8, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    labels[::3] = -100
    a = hs.clone().requires_grad_()
    loss = completion_ce_loss(a, W, labels, chunk_size=5)
    loss.backward()
    b = hs.detach().float().clone().requires_grad_()
    ref = F.cross_entropy(b @ W.float().T, labels, ignore_index=-100)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= tol
    assert rel_err(a.grad, b.grad) <= tol
    assert torch.all(a.grad[::3] == 0)
    # Same with a custom ignore index and a different chunk size.
    labels2 = labels.masked_fill(labels == -100, 7000)
    c = hs.clone().requires_grad_()
    loss2 = completion_ce_loss(c, W, labels2, ignore_index=7000, chunk_size=100)
    loss2.backward()
    assert rel_err(loss2.detach(), ref.detach()) <= tol and rel_err(c.grad, b.grad) <= tol


def test_completion_ce_all_ignored_and_bad_labels():
    hs, _, W, _ = make_inputs(seed=9)
    a = hs.clone().requires_grad_()
    loss = completion_ce_loss(a, W, torch.full((N,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a.grad))
    labels = torch.zeros(N, dtype=torch.long)
    labels[4] = V
    with pytest.raises(ValueError, match=r"labels\[4\]"):
        completion_ce_loss(hs, W, labels)


def test_weighted_ce_at_with_padding_entries_matches_weighted_cross_entropy():
    """Fixed-size rows as the CUDA-graph SFT step builds them: real positions with their weights, then
    weight-0 padding entries that all point at row 0 (a repeated index must add nothing)."""
    hs, _, W, _ = make_inputs(seed=11)
    g = torch.Generator().manual_seed(2)
    rows = torch.tensor([1, 4, 5, 9, 12])
    targets = torch.randint(0, V, (5,), generator=g)
    w = torch.rand(5, generator=g)
    pad = 4
    rows_p = torch.cat([rows, torch.zeros(pad, dtype=torch.long)])
    targets_p = torch.cat([targets, torch.randint(0, V, (pad,), generator=g)])
    w_p = torch.cat([w, torch.zeros(pad)])
    a = hs.clone().requires_grad_()
    loss = weighted_ce_at(a, W, rows_p, targets_p, w_p, chunk_size=3)
    loss.backward()
    b = hs.detach().clone().requires_grad_()
    ref = (F.cross_entropy(b[rows] @ W.T, targets, reduction="none") * w).sum()
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5
    assert rel_err(a.grad, b.grad) <= 1e-5
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert torch.all(a.grad[untouched] == 0)
    with pytest.raises(ValueError, match="one length"):
        weighted_ce_at(hs, W, rows, targets[:-1], w)


def test_token_logprobs():
    hs, _, W, _ = make_inputs(seed=10)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    ref = ((hs @ W.T) / 0.8).log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    out = token_logprobs(hs, W, ids, temperature=0.8, chunk_size=6)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    ids[0] = V
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(hs, W, ids)

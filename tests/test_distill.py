"""train/distill.py: one on-policy step against a naive full-logits reference (loss and LoRA gradients),
exact zero when teacher = student, micro-batching = one batch, explicit grouping, the repetition
filter, sampler vs trainer log-probs, and a closed-book answer learned from an open-book teacher."""
import math
from collections import defaultdict

import pytest
import torch

from model import load_model
from model.lora import LoraConfig, add_lora, disabled, lora_modules, lora_parameters, snapshot, swapped
from test_sft import tiny_model
from train.schedules import lr_factor
from train.distill import (DistillConfig, Distiller, DistillPrompt, repetition_ratio,
                           sequence_weights)
from train.sft import SFTConfig, sft


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def randomize_lora(model, seed=7, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def small_vocab_lora(dropout=0.05, seed=0):
    """A 12-token vocabulary so sampled rollouts repeat 3-grams often (the filter gets exercised)."""
    model = tiny_model(vocab=12, seed=seed, head_std=0.3)
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=dropout))
    randomize_lora(model)
    return model


PROMPTS = [  # teacher prompts differ from (and are longer than) the student prompts, lengths vary
    DistillPrompt([1, 3, 4], [1, 5, 6, 7, 3, 4], prompt_index=40),
    DistillPrompt([1, 8, 9, 10, 11, 3], [1, 4, 3, 8, 9, 10, 11, 3], prompt_index=7),
    DistillPrompt([1, 6], [1, 9, 9, 6], prompt_index=12),
]


def config(**kw):
    base = dict(lr=1e-3, max_steps=10, warmup_steps=2, rollouts_per_prompt=4, micro_batches=1,
                max_completion_length=12, top_k_support=4, repetition_window=8, repetition_threshold=0.15)
    return DistillConfig(**{**base, **kw})


# ---- naive reference ---------------------------------------------------------------------------

def naive_repetition(tokens, n, window):
    tail = tokens[-max(window, n):]
    grams = [tuple(tail[i:i + n]) for i in range(len(tail) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def naive_kl(zs, zt, direction, top_k):
    """Per-token divergence from full logits, the support as an explicit boolean mask."""
    if top_k:
        mask = torch.zeros_like(zs, dtype=torch.bool)
        mask.scatter_(1, zt.topk(top_k, 1).indices, True)
        mask.scatter_(1, zs.topk(top_k, 1).indices, True)
        zs, zt = zs.masked_fill(~mask, -math.inf), zt.masked_fill(~mask, -math.inf)
    ls, lt = zs.log_softmax(1), zt.log_softmax(1)
    ps, pt = ls.exp(), lt.exp()
    ls, lt = torch.nan_to_num(ls, neginf=0.0), torch.nan_to_num(lt, neginf=0.0)
    if direction == "forward":
        return (pt * (lt - ls)).sum(1)
    return (ps * (ls - lt)).sum(1)


def naive_step_loss(model, prompts, rollouts, cfg):
    """One row at a time, no padding, full logits: the docs/method.md 3.6 loss, differentiable."""
    by_index = {i: p for i, p in enumerate(prompts)}
    scores, kls, keep, lens = [], [], [], []
    for c in rollouts:
        p = by_index[c.prompt_index]
        y = torch.tensor(c.tokens)
        with torch.no_grad():
            with disabled(model):
                zt = model(torch.tensor([p.teacher_ids + c.tokens]))[0, len(p.teacher_ids) - 1:-1] / cfg.kd_temperature
        zs = model(torch.tensor([p.student_ids + c.tokens]))[0, len(p.student_ids) - 1:-1] / cfg.kd_temperature
        scores.append(float(zt.log_softmax(1).gather(1, y[:, None]).mean()))
        kls.append(naive_kl(zs, zt, cfg.direction, cfg.top_k_support))
        keep.append(1.0 if naive_repetition(c.tokens, cfg.repetition_ngram_n, cfg.repetition_window) <= cfg.repetition_threshold else 0.0)
        lens.append(len(c.tokens))
    groups = defaultdict(list)  # by the prompt each rollout was sampled for, wherever the rows sit
    for r, c in enumerate(rollouts):
        groups[c.prompt_index].append(r)
    w = [0.0] * len(rollouts)
    for rows in groups.values():
        z = sum(math.exp(scores[r] / cfg.seq_weight_temperature) for r in rows)
        for r in rows:
            w[r] = math.exp(scores[r] / cfg.seq_weight_temperature) / z * keep[r]
    num = sum(w[r] * kls[r].sum() for r in range(len(rollouts)))
    den = sum(w[r] * lens[r] for r in range(len(rollouts)))
    return num / max(den, 1e-8), keep


@pytest.mark.parametrize("direction,top_k", [("forward", 4), ("reverse", 4), ("forward", 0)])
def test_step_matches_naive_reference(direction, top_k):
    model = small_vocab_lora(dropout=0.05)  # the step must switch the dropout off
    cfg = config(direction=direction, top_k_support=top_k, micro_batches=2)
    d = Distiller(model, lora_parameters(model), cfg, stop_ids=[2])
    stats = d.compute_gradients(PROMPTS, seed=3)
    ours = [p.grad.clone() for p in lora_parameters(model)]
    rollouts = d.last_rollouts
    assert [(c.prompt_index, c.sample_index) for c in rollouts] == [(i, s) for i in range(3) for s in range(4)]
    mods = [m for _, m in lora_modules(model)]
    assert mods and all(m.dropout == 0.05 for m in mods)  # restored

    for p in lora_parameters(model):
        p.grad = None
    model.eval()
    want, keep = naive_step_loss(model, PROMPTS, rollouts, cfg)
    want.backward()
    assert 0 < sum(keep) < len(keep)  # the filter dropped some rollouts and kept others
    assert stats["kept_fraction"] == pytest.approx(sum(keep) / len(keep))
    assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)
    for a, p in zip(ours, lora_parameters(model)):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
    assert stats["completion_length"] == pytest.approx(sum(len(c.tokens) for c in rollouts) / len(rollouts))


def test_a_prompt_drawn_twice_is_two_groups():
    model = small_vocab_lora()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    d = Distiller(model, lora_parameters(model), config(), stop_ids=[2])
    stats = d.compute_gradients(prompts, seed=4)
    model.eval()
    want, _ = naive_step_loss(model, prompts, d.last_rollouts, config())
    assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_micro_batches_equal_one_batch():
    grads = {}
    for m in (1, 2, 5, "2 + activation checkpointing"):
        model = small_vocab_lora()
        cfg = config(micro_batches=2, grad_checkpointing=True) if isinstance(m, str) else config(micro_batches=m)
        d = Distiller(model, lora_parameters(model), cfg, stop_ids=[2])
        stats = d.compute_gradients(PROMPTS, seed=11)
        grads[m] = ([p.grad.clone() for p in lora_parameters(model)], stats["loss"])
        assert not model.gradient_checkpointing  # restored
    assert grads[1][1] > 0
    for m in (2, 5, "2 + activation checkpointing"):
        assert grads[m][1] == pytest.approx(grads[1][1], rel=1e-6)
        for a, b in zip(grads[m][0], grads[1][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # fp32 sums in another order


def test_same_teacher_and_student_give_exact_zero():
    model = load_model("tiny-random")
    params = add_lora(model, LoraConfig(rank=4, alpha=8))  # B = 0: the student is the base model
    same = [DistillPrompt(p.student_ids, p.student_ids, p.prompt_index) for p in PROMPTS]
    d = Distiller(model, params, config(micro_batches=2), stop_ids=[2])
    stats = d.compute_gradients(same, seed=0)
    assert stats["loss"] == 0.0 and stats["kl_per_token"] == 0.0
    assert all(bool((p.grad == 0).all()) for p in params)
    before = [p.detach().clone() for p in params]
    d = Distiller(model, params, config(micro_batches=2, warmup_steps=0), stop_ids=[2])
    stats = d.step(same, seed=0)
    assert stats["grad_norm"] == 0.0 and stats["lr"] == 1e-3
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    # the check can fail: an open-book teacher prompt gives a loss and a gradient
    stats = d.compute_gradients(PROMPTS, seed=0)
    assert stats["loss"] > 0 and any(bool((p.grad != 0).any()) for p in params)


def test_teacher_factory_snapshot_is_exact_zero_then_moves():
    """S=T: the teacher is a frozen snapshot of the adapter swapped in for the teacher forward."""
    model = small_vocab_lora()
    params = lora_parameters(model)
    teacher_state = snapshot(model)
    same = [DistillPrompt(p.student_ids, p.student_ids, p.prompt_index) for p in PROMPTS]
    d = Distiller(model, params, config(lr=5e-2, warmup_steps=0), stop_ids=[2],
                  teacher=lambda: swapped(model, teacher_state))
    assert d.step(same, seed=0)["loss"] == 0.0
    stats = d.step(PROMPTS, seed=1)  # open-book prompts: the adapter moves away from the snapshot
    assert stats["loss"] > 0
    stats = d.step(same, seed=2)  # now the student differs from the frozen teacher even on equal prompts
    assert stats["loss"] > 0
    assert any(not torch.equal(teacher_state[k], v) for k, v in snapshot(model).items())


def test_sampler_and_trainer_logprobs_agree_in_fp32():
    model = load_model("tiny-random")
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1))
    randomize_lora(model, std=0.2)
    d = Distiller(model, lora_parameters(model), config(max_completion_length=16, micro_batches=2), stop_ids=[2])
    stats = d.compute_gradients(PROMPTS, seed=5)
    assert sum(len(c.tokens) for c in d.last_rollouts) == 3 * 4 * 16
    assert stats["max_logprob_diff"] < 1e-4


def test_sequence_weights_group_interleaved_rows():
    scores = torch.tensor([-1.0, -0.5, -2.0, -3.0, -0.1, -0.7, -1.5])
    groups = [5, 2, 5, 9, 2, 5, 9]  # rows of one prompt are not contiguous
    w = sequence_weights(scores, groups)

    def soft(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    g5, g2, g9 = soft([-1.0, -2.0, -0.7]), soft([-0.5, -0.1]), soft([-3.0, -1.5])
    want = [g5[0], g2[0], g5[1], g9[0], g2[1], g5[2], g9[1]]
    assert w.tolist() == pytest.approx(want, rel=1e-6)
    w2 = sequence_weights(scores, groups, temperature=2.0)
    assert w2[1].item() == pytest.approx(math.exp(-0.25) / (math.exp(-0.25) + math.exp(-0.05)), rel=1e-6)
    # contiguous-block grouping (what the reference assumed) would give something else here
    assert w.tolist() != pytest.approx(soft([-1.0, -0.5, -2.0]) + soft([-3.0, -0.1]) + soft([-0.7, -1.5]), rel=1e-3)


def test_repetition_ratio_by_hand():
    assert repetition_ratio([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 48) == pytest.approx(1 - 3 / 7)
    assert repetition_ratio([1, 2, 3, 4, 5], 3, 48) == 0.0
    assert repetition_ratio([7, 7], 3, 48) == 0.0  # shorter than n: kept
    assert repetition_ratio([7, 7, 7, 7], 3, 48) == pytest.approx(0.5)  # (7,7,7) twice
    # only the last `window` tokens count: the repeats at the front are outside it
    assert repetition_ratio([5, 5, 5, 5, 5, 1, 2, 3, 4, 6], 3, 5) == 0.0
    assert repetition_ratio([5, 5, 5, 5, 5, 1, 2, 3, 4, 6], 3, 10) == pytest.approx(1 - 6 / 8)
    assert repetition_ratio([1, 2, 9, 9, 9], 3, 2) == 0.0  # the window is at least n: one 3-gram, unique


def test_lr_schedule():
    assert [lr_factor("constant_with_warmup", s, 0, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("constant_with_warmup", 0, 0, 0) == 1.0


def test_bad_input_is_named():
    model = small_vocab_lora()
    d = Distiller(model, lora_parameters(model), config(), stop_ids=[2])
    with pytest.raises(ValueError, match="prompt 3 has empty teacher_ids"):
        d.step([DistillPrompt([1], [], 3)], seed=0)
    with pytest.raises(ValueError, match="direction"):
        Distiller(model, lora_parameters(model), config(direction="sideways"), stop_ids=[2])


# ---- learning ----------------------------------------------------------------------------------

BOS, EOS, ANS, Q, COLON = 1, 2, 3, 4, 5
SUBJECTS, ANSWERS = list(range(6, 14)), list(range(16, 32))


def open_book(s, x):  # "The answer is x. Q: s :"
    return [BOS, ANS, x, Q, s, COLON]


def closed_book(s):  # "Q: s :"
    return [BOS, Q, s, COLON]


def p_next(model, prompt, token):
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0, -1].softmax(-1)[token].item()


def test_distillation_teaches_the_closed_book_answer():
    """A random network does not read answers out of its context, so it could not act as an open-book
    teacher. We first give the base that skill (full-parameter SFT, through our own `sft`, on
    "The answer is x. Q: s :" -> "x <eos>" with random s and x), so the base with the answer in its
    prompt puts ~0.99 on it while the closed-book prompt "Q: s :" (never seen in training) gives it
    ~1/16. Then a fresh LoRA is distilled for 30 steps on two closed-book prompts against the
    open-book teacher (the base, LoRA disabled). Every rollout's first position carries the full
    teacher signal and rollouts that start with the answer get the larger sequence weight, so the
    student's closed-book probability of the answer rises to near 1: a large, robust margin."""
    model = tiny_model(vocab=32, seed=0)
    g = torch.Generator().manual_seed(1)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    fmt = []
    for _ in range(96):
        x = pick(ANSWERS)
        fmt.append((open_book(pick(SUBJECTS), x), [x, EOS]))
    model.requires_grad_(True)
    sft(model, fmt, list(model.parameters()),
        SFTConfig(lr=1e-2, epochs=40, batch_size=16, warmup_ratio=0.05, max_grad_norm=1.0, stop_loss=0.02,
                  stop_consecutive=3))
    model.requires_grad_(False)

    facts = [(9, 23), (7, 30)]
    assert all(p_next(model, open_book(s, x), x) > 0.9 for s, x in facts)  # the teacher knows
    before = [p_next(model, closed_book(s), x) for s, x in facts]
    assert max(before) < 0.2  # the student does not

    params = add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.05))
    d = Distiller(model, params, DistillConfig(lr=1e-2, max_steps=30, warmup_steps=3, rollouts_per_prompt=4,
                                               max_completion_length=4, top_k_support=8), stop_ids=[EOS])
    prompts = [DistillPrompt(closed_book(s), open_book(s, x), i) for i, (s, x) in enumerate(facts)]
    losses = []
    while not d.finished:
        losses.append(d.step(prompts)["loss"])
    assert len(losses) == 30
    after = [p_next(model, closed_book(s), x) for s, x in facts]
    assert all(a > 0.8 and a > b + 0.6 for a, b in zip(after, before)), (before, after)
    assert losses[-1] < 0.1 * losses[0]
    with disabled(model):  # the teacher is untouched
        assert [p_next(model, closed_book(s), x) for s, x in facts] == pytest.approx(before, abs=1e-6)


def test_unknown_schedule_is_refused_at_construction():
    model = small_vocab_lora()
    with pytest.raises(ValueError, match="DistillConfig.lr_scheduler must be one of"):
        Distiller(model, lora_parameters(model), config(lr_scheduler="cosine_restarts"), stop_ids=[2])

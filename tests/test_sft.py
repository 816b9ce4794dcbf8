"""train/sft.py: a tiny model learns a fixed completion, early stop, the warmup-cosine schedule against
the formula, only LoRA changes, truncation, collation and right padding without a mask."""
import math

import pytest
import torch

from model import generate
from model.config import ModelConfig
from model.decoder import Transformer
from model.lora import LoraConfig, add_lora, lora_parameters
from train.losses import completion_ce_loss
from train.schedules import lr_factor
import train.sft as S
from train.sft import SFTConfig, pack, sft, sft_plan, truncate_example

PROMPT = [1, 10, 11, 12, 13]
COMPLETION = [20, 33, 41, 20, 55, 7, 2]  # 20 twice, in different contexts; 2 = end of turn


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(vocab: int = 64, seed: int = 0, head_std: float = 0.3) -> Transformer:
    """A 2-layer Llama with a small vocabulary and an lm_head/embedding large enough (std 0.3) that a
    LoRA can push one token's probability near 1. (The loader's 'tiny-random' cannot: its tied
    embedding has std 0.05 and the final norm is frozen, so its logits stay within ~±3 over 49k
    tokens and the cross-entropy floor is ~8 nats under LoRA-only training.)"""
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=[2])
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, head_std if ("lm_head" in name or "embed" in name) else 0.1, generator=g)
    return model.requires_grad_(False).eval()


def lora_model(seed: int = 0, dropout: float = 0.05):
    model = tiny_model(seed=seed)
    return model, add_lora(model, LoraConfig(rank=8, alpha=16, dropout=dropout))


def test_learns_a_fixed_completion():
    model, params = lora_model()
    modes = []
    out = sft(model, [(PROMPT, COMPLETION)] * 4, params,
              SFTConfig(lr=2e-2, epochs=60, batch_size=2, max_grad_norm=1.0, stop_loss=None),
              log=lambda d: modes.append(model.training))
    assert out["steps"] == 120 and not out["stopped_early"]
    assert out["losses"][0] > 3.0  # it starts far from the answer ...
    assert out["final_loss"] < 0.1  # ... and learns it
    assert all(modes) and not model.training  # train mode (dropout on) during SFT, eval after
    (c,) = generate(model, [PROMPT], max_new_tokens=12, temperature=0, stop_ids=[2])
    assert c.tokens == COMPLETION and c.finish_reason == "stop"


def test_early_stop_matches_the_unstopped_trajectory():
    """The loop is deterministic for a seed, so the run without early stop is the reference: the
    stopped run must end at the first step that closes `consecutive` steps below the threshold,
    with the same losses up to there."""
    kw = dict(lr=2e-2, epochs=30, batch_size=2, max_grad_norm=1.0)
    model, params = lora_model()
    full = sft(model, [(PROMPT, COMPLETION)] * 4, params, SFTConfig(**kw, stop_loss=None))
    assert full["steps"] == full["total_steps"] == 60 and not full["stopped_early"]
    threshold, consecutive = 0.5, 3
    L = full["losses"]
    first = next(i for i in range(consecutive - 1, len(L)) if all(x < threshold for x in L[i - consecutive + 1:i + 1]))
    assert 5 < first < len(L) - 5  # reachable, and not trivially at either end

    model, params = lora_model()
    lrs = []
    out = sft(model, [(PROMPT, COMPLETION)] * 4, params,
              SFTConfig(**kw, stop_loss=threshold, stop_consecutive=consecutive), log=lambda d: lrs.append(d["lr"]))
    assert out["stopped_early"] and out["steps"] == first + 1
    assert out["losses"] == L[: first + 1] and out["final_loss"] == L[first]
    assert all(p.grad is None for p in params)  # the step queued behind the stopping one left no gradient
    # the schedule still runs over the planned 60 steps (docs/method.md 3.2), not over the steps taken
    total, warmup = 60, 6
    assert lrs == pytest.approx([2e-2 * (s / warmup if s < warmup else
                                        0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
                                 for s in range(first + 1)], rel=1e-12)


def collate(rows):
    """Right-padded (input_ids, attention_mask, labels) with -100 on the prompt and padding: the usual
    Hugging Face form, the reference that `pack`'s flat learned positions must agree with."""
    seqs = [(p + c)[:-1] for p, c in rows]
    T = max(len(q) for q in seqs)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, ((p, c), q) in enumerate(zip(rows, seqs)):
        ids[b, : len(q)], mask[b, : len(q)] = torch.tensor(q), 1
        labels[b, len(p) - 1: len(p) - 1 + len(c)] = torch.tensor(c)
    return ids, mask, labels


def plain_loop(model, examples, params, cfg: SFTConfig, packed: bool = False):
    """The SFT loop written the obvious way (each step: forward, backward, clip, AdamW, read the loss,
    maybe stop), the reference for `sft`, which reads each loss one step late. The forward runs
    right-padded rows with -100 labels, or with `packed` sft's own packed rows (then the same adapter
    dropout masks are drawn)."""
    from model.decoder import Segments
    total, warmup = sft_plan(len(examples), cfg.batch_size, cfg.epochs, cfg.warmup_ratio)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, below, step = [], 0, 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for b0 in range(0, len(order), cfg.batch_size):
                batch = [examples[i] for i in order[b0:b0 + cfg.batch_size]]
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor("cosine", step, total, warmup)
                if packed:
                    b = S.pack_stream(batch)
                    h = model.run(b.ids, b.positions, Segments(b.starts, 1024))[0]
                    labels = torch.full((h.shape[0],), -100)
                    labels[b.rows] = b.targets
                else:
                    ids, _, labels = collate(batch)
                    h = model.hidden(ids)
                loss = completion_ce_loss(h.reshape(-1, h.shape[-1]), model.lm_head.weight, labels.reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                below = below + 1 if cfg.stop_loss is not None and losses[-1] < cfg.stop_loss else 0
                if cfg.stop_loss is not None and below >= cfg.stop_consecutive:
                    model.eval()
                    return losses
    model.eval()
    return losses


def test_equals_the_plain_loop_up_to_the_early_stop():
    examples = [(PROMPT, COMPLETION[: 3 + i % 4]) for i in range(6)]
    cfg = SFTConfig(lr=2e-2, epochs=30, batch_size=4, max_grad_norm=1.0, stop_loss=0.6, stop_consecutive=2)
    model, params = lora_model()
    want = plain_loop(model, examples, params, cfg, packed=True)
    assert 5 < len(want) < 30 * 2 - 5  # the stop falls inside the run
    model2, params2 = lora_model()
    out = sft(model2, examples, params2, cfg)
    assert out["stopped_early"] and out["losses"] == want
    assert all(torch.equal(a, b) for a, b in zip(params2, params))


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("step", [256, 2])
def test_packed_batches_equal_the_plain_loop(step, fixed, monkeypatch):
    """Packed steps (a batch's rows end to end, attention within each row), unpadded and with the padding
    the CUDA-graph steps run (each batch at its length bucket, with the most learned tokens of that
    bucket's batches; here a 10-example set whose last batch is short), without the graph: the same
    losses and adapter as the plain loop over right-padded rows, up to float rounding of other matmul
    shapes. A step of 2 makes several buckets, so batches of one run have different shapes."""
    monkeypatch.setattr(S, "PACK_STEP", step)
    examples = [(PROMPT[: 1 + i % 5], COMPLETION[: 2 + i % 6]) for i in range(10)]
    cfg = SFTConfig(lr=2e-2, epochs=6, batch_size=4, max_grad_norm=1.0, stop_loss=None)
    model, params = lora_model(dropout=0.0)
    want = plain_loop(model, examples, params, cfg)
    model2, params2 = lora_model(dropout=0.0)
    out = sft(model2, examples, params2, cfg, fixed_shapes=fixed)
    assert out["losses"] == pytest.approx(want, rel=1e-4, abs=1e-5) and out["cuda_graph"] is False
    assert len(want) == 18 and want[-1] < want[0] - 1.0  # it trained
    if fixed:
        assert (out["shapes"] > 3) == (step == 2) and 0 < out["padding"] < 1
    else:
        assert out["padding"] == 0
    for a, b in zip(params2, params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_step_shapes_bucket_each_batch_by_its_packed_length(monkeypatch):
    """Hand-built plan: a batch's positions are its rows' total length (prompt + completion - 1 each)
    rounded up to PACK_STEP; batches of one (rows, positions) bucket share the most learned tokens."""
    monkeypatch.setattr(S, "PACK_STEP", 8)
    r = lambda p, c: ([1] * p, [2] * c)  # noqa: E731
    plan = [(0, [r(3, 2), r(5, 4)]), (0, [r(2, 2), r(2, 3)]), (1, [r(10, 6), r(1, 1)]), (1, [r(1, 1)])]
    # packed lengths: 4 + 8, 3 + 4, 15 + 1, 1 -> 16, 8, 16, 8; learned: 6, 5, 7, 1
    assert S._step_shapes(plan) == [(2, 16, 7), (2, 8, 5), (2, 16, 7), (1, 8, 1)]
    for (_, b), shape in zip(plan, S._step_shapes(plan)):
        assert S.pack_stream(b, shape).ids.shape == (1, shape[1])


def test_schedule_and_only_lora_changes():
    model, params = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = [p.detach().clone() for p in params]
    logs = []
    # 10 examples, batch 4 -> 3 steps per epoch (the last batch short), 5 epochs -> 15 steps, warmup ceil(1.5) = 2
    examples = [(PROMPT, COMPLETION[: 2 + i % 5]) for i in range(10)]
    out = sft(model, examples, params, SFTConfig(lr=1e-3, epochs=5, batch_size=4, stop_loss=None), log=logs.append)
    assert out["steps"] == 15
    lrs = [d["lr"] for d in logs]
    assert lrs[:3] == pytest.approx([0.0, 0.5e-3, 1e-3], abs=1e-15)  # hand values
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 12 / 13)), rel=1e-12)
    assert lrs == pytest.approx([1e-3 * lr_factor("cosine", s, 15, 2) for s in range(15)], rel=1e-12)
    # each epoch sees every example once: completion tokens per epoch = sum of completion lengths
    per_epoch = [sum(d["tokens"] for d in logs if d["epoch"] == e) for e in range(5)]
    assert per_epoch == [sum(len(c) for _, c in examples)] * 5
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n  # the base is bit-identical
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(model)))


def test_plan_matches_the_reference_schedule():
    assert sft_plan(25, 12, 125, 0.1) == (375, 38)  # docs/method.md 3.2: 3 steps/epoch, warmup ~38
    assert sft_plan(24, 12, 1, 0.1) == (2, 1)
    assert lr_factor("cosine", 38, 375, 38) == 1.0 and lr_factor("cosine", 375, 375, 38) == 0.0


def test_truncation_keeps_the_prompt_end_and_the_completion():
    assert truncate_example([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert truncate_example([1, 2, 3, 4, 5, 6], [7, 8, 9], 5) == ([5, 6], [7, 8, 9])
    assert truncate_example([1, 2, 3], [4, 5, 6, 7, 8], 4) == ([3], [4, 5, 6])


def test_truncated_examples_are_counted():
    model, params = lora_model()
    out = sft(model, [(list(range(3, 40)), COMPLETION), (PROMPT, COMPLETION)], params,
              SFTConfig(lr=1e-3, epochs=1, batch_size=2, max_length=16, stop_loss=None))
    assert out["truncated"] == 1 and out["steps"] == 1


def test_pack_learns_only_the_completion():
    b = pack([([5, 6, 7], [8, 9]), ([4], [3])])
    assert b.ids.tolist() == [[5, 6, 7, 8], [4, 0, 0, 0]]
    # position 2 (token 7) predicts 8, 3 predicts 9; row 1's position 0 (4) predicts 3 -> flat 4 + 0
    assert b.rows.tolist() == [2, 3, 4] and b.targets.tolist() == [8, 9, 3] and b.tokens == 3
    assert b.weight.tolist() == pytest.approx([1 / 3] * 3)
    ids, _, labels = collate([([5, 6, 7], [8, 9]), ([4], [3])])  # the same positions as -100 labels
    flat = labels.reshape(-1)
    assert (flat != -100).nonzero().squeeze(1).tolist() == b.rows.tolist()
    assert flat[b.rows].tolist() == b.targets.tolist()


def test_pack_stream_lays_rows_end_to_end():
    """Hand values: rows [5 6 7 | 8] and [4], positions restarting per row, boundaries, learned positions;
    a fixed shape adds an empty row segment, the padding tail and weight-0 learned entries."""
    rows = [([5, 6, 7], [8, 9]), ([4], [3])]
    b = S.pack_stream(rows)
    assert b.ids.tolist() == [[5, 6, 7, 8, 4]] and b.positions.tolist() == [[0, 1, 2, 3, 0]]
    assert b.starts.tolist() == [0, 4, 5, 5] and b.real == 5
    # position 2 (token 7) predicts 8, 3 predicts 9; the second row's position 0 (flat 4) predicts 3
    assert b.rows.tolist() == [2, 3, 4] and b.targets.tolist() == [8, 9, 3]
    assert b.weight.tolist() == pytest.approx([1 / 3] * 3)
    f = S.pack_stream(rows, shape=(3, 8, 5))
    assert f.ids.tolist() == [[5, 6, 7, 8, 4, 0, 0, 0]] and f.starts.tolist() == [0, 4, 5, 5, 8]
    assert f.rows.tolist() == [2, 3, 4, 0, 0] and f.targets.tolist() == [8, 9, 3, 0, 0]
    assert f.weight.tolist() == pytest.approx([1 / 3] * 3 + [0, 0])
    with pytest.raises(ValueError, match="fixed shape"):
        S.pack_stream(rows, shape=(2, 4, 3))


def test_packed_rows_attend_only_within_themselves():
    """Hidden states of rows packed end to end under Segments equal each row run alone (a 2-layer GQA
    model, fp32), padding tail included as its own segment."""
    from model.decoder import Segments
    model = tiny_model()
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 9, 9, 4]]
    b = S.pack_stream([(r[:1], r[1:] + [2]) for r in rows], shape=(4, 16, 16))
    with torch.no_grad():
        packed = model.run(b.ids, b.positions, Segments(b.starts, 16))[0]
        for r, (a, e) in zip(rows, zip(b.starts.tolist(), b.starts.tolist()[1:])):
            torch.testing.assert_close(packed[a:e], model.hidden(torch.tensor([r]))[0], rtol=1e-5, atol=1e-5)


def test_right_padding_needs_no_mask():
    model = tiny_model()
    ids, mask, _ = collate([([1, 2, 3, 4, 5, 6], [7, 8]), ([1, 2], [3]), ([9, 9, 9], [4, 5, 6])])
    with torch.no_grad():
        masked = model.hidden(ids, mask)
        plain = model.hidden(ids)
    real = mask.bool()
    assert not bool(real.all())
    torch.testing.assert_close(plain[real], masked[real], rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    model, params = lora_model()
    cfg = SFTConfig(lr=1e-3, epochs=1, batch_size=1)
    with pytest.raises(ValueError, match=r"examples\[1\] has an empty completion"):
        sft(model, [(PROMPT, COMPLETION), (PROMPT, [])], params, cfg)
    with pytest.raises(ValueError, match=r"examples\[0\] has token id 64"):
        sft(model, [(PROMPT, [64, 2])], params, cfg)
    with pytest.raises(ValueError, match="require grad"):
        sft(model, [(PROMPT, COMPLETION)], [model.lm_head.weight], cfg)


def test_lr_scheduler_and_adam_keys_reach_the_loop():
    """`lr_scheduler` and the Adam keys are used, not just recorded: a linear schedule's rates (hand values),
    and the optimizer built with the given betas and eps."""
    from train.schedules import lr_factor
    assert [lr_factor("linear", s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [lr_factor("constant", s, 10, 2) for s in (0, 5)] == [1.0, 1.0]
    assert [lr_factor("constant_with_warmup", s, 10, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    model, params = lora_model()
    logs = []
    examples = [(PROMPT, COMPLETION[:3])] * 4
    sft(model, examples, params, SFTConfig(lr=1e-3, epochs=5, batch_size=2, stop_loss=None, warmup_ratio=0.2,
                                           lr_scheduler="linear"), log=logs.append)
    assert [d["lr"] for d in logs] == pytest.approx([1e-3 * lr_factor("linear", s, 10, 2) for s in range(10)])
    seen = {}
    real = torch.optim.AdamW

    def spy(p, **kw):
        seen.update(kw)
        return real(p, **kw)
    torch.optim.AdamW, saved = spy, torch.optim.AdamW
    try:
        sft(model, examples, params, SFTConfig(lr=1e-3, epochs=1, batch_size=2, stop_loss=None, adam_beta1=0.8,
                                               adam_beta2=0.95, adam_eps=1e-6), log=None)
    finally:
        torch.optim.AdamW = saved
    assert seen["betas"] == (0.8, 0.95) and seen["eps"] == 1e-6

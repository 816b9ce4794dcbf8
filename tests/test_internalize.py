"""code_edit.internalize, the loop: steps from the schedule, seeded draws of prompts_per_step rows with
explicit prompt indices, student = user turn only, teacher = cheat sheet + the same user turn, and the
DistillConfig taken from the preset. Distiller is replaced by a recorder (train.distill tests itself)."""
import dataclasses

import pytest

import code_edit.internalize as I
import train.distill as D
from code_edit.config import load_hparams
from code_edit.data import EditRequest
from model import load_tokenizer


def req(i):
    return EditRequest(case_id=i, rewrite_idx=0, subject=f"S{i}", prompt="{} is owned by", question=f"Who owns S{i}?",
                       old_answer="Old", new_answer=f"New{i}", article=f"<p>New{i} bought S{i}.</p>", relation_id="P1")


@pytest.fixture()
def recorder(monkeypatch):
    made = []

    class Recorder:
        def __init__(self, model, params, cfg, stop_ids, *, teacher=None):
            self.cfg, self.stop_ids, self.teacher, self.calls = cfg, stop_ids, teacher, []
            made.append(self)

        def step(self, prompts, *, seed):
            self.calls.append((prompts, seed))
            return {"loss": float(len(self.calls)), "rollouts": len(prompts) * self.cfg.rollouts_per_prompt}

    monkeypatch.setattr(D, "Distiller", Recorder)
    monkeypatch.setattr("model.lora.lora_parameters", lambda model: [])
    return made


def test_internalize_drives_distiller(recorder):
    tok = load_tokenizer("tiny-random")
    cfg = load_hparams("tiny")
    reqs = [req(1), req(2)]
    seen = []
    out = I.internalize(object(), tok, reqs, cfg, seed=11, on_step=lambda s, n, st: seen.append((s, n)))
    d = recorder[0]
    steps = cfg.internalize.max_steps_base + cfg.internalize.max_steps_per_extra_edit  # 2 edits
    assert out["steps"] == steps == len(d.calls) and seen == [(s, steps) for s in range(1, steps + 1)]
    assert out["rows"] == 28 and (out["first_loss"], out["last_loss"]) == (1.0, float(steps))
    # DistillConfig straight from the preset
    it = cfg.internalize
    assert (d.cfg.lr, d.cfg.max_steps, d.cfg.warmup_steps, d.cfg.rollouts_per_prompt, d.cfg.micro_batches) == \
        (it.learning_rate, steps, I.warmup_steps(steps, it.warmup_ratio), it.rollouts_per_prompt, it.micro_batches)
    assert (d.cfg.top_k_support, d.cfg.direction, d.cfg.max_completion_length, d.cfg.top_p) == \
        (it.top_k_support, it.direction, it.max_completion_length, it.top_p)
    assert d.teacher is None and d.stop_ids == list(tok.eos_ids)
    rows = I.prompt_pool(reqs, mode="causal")
    seeds = [s for _, s in d.calls]
    assert len(set(seeds)) == steps
    for prompts, _ in d.calls:
        assert len(prompts) == it.prompts_per_step
        assert len({p.prompt_index for p in prompts}) == len(prompts)  # no row twice in one step
        for p in prompts:
            row = rows[p.prompt_index]
            assert p.student_ids == tok.encode(tok.chat(row.student_messages))
            assert p.teacher_ids == tok.encode(tok.chat(row.teacher_messages))
            student, teacher = tok.decode(p.student_ids, False), tok.decode(p.teacher_ids, False)
            assert "<|im_start|>system" not in student and "HIDDEN CONTEXT" not in student
            assert teacher.startswith("<|im_start|>system") and row.new_answer in teacher
            assert teacher.endswith(student)  # same user turn (and generation prompt) after the cheat sheet
    # the same seed draws the same prompts
    again = I.internalize(object(), tok, reqs, cfg, seed=11)
    assert [[p.prompt_index for p in ps] for ps, _ in recorder[1].calls] == \
        [[p.prompt_index for p in ps] for ps, _ in d.calls] and again["steps"] == steps


def test_student_prompt_left_truncated(recorder):
    tok = load_tokenizer("tiny-random")
    cfg = load_hparams("tiny")
    cfg = dataclasses.replace(cfg, internalize=dataclasses.replace(cfg.internalize, max_prompt_length=20))
    I.internalize(object(), tok, [req(1)], cfg, seed=0)
    for prompts, _ in recorder[0].calls:
        for p in prompts:
            full = tok.encode(tok.chat(I.prompt_pool([req(1)])[p.prompt_index].student_messages))
            assert p.student_ids == full[-20:] and len(p.teacher_ids) > 20


def test_prompt_draws_walk_shuffled_epochs():
    draws = I.prompt_draws(14, 4, 20, seed=5)
    assert draws == I.prompt_draws(14, 4, 20, seed=5) != I.prompt_draws(14, 4, 20, seed=6)
    flat = [i for d in draws for i in d]
    assert sorted(flat[:14]) == list(range(14))  # the first 14 draws are one permutation of the pool
    assert sorted(flat[14:28]) == list(range(14))
    assert all(len(set(d)) == 4 for d in draws)
    # more prompts per step than rows: repeats are unavoidable but every row appears
    small = I.prompt_draws(2, 3, 2, seed=0)
    assert all(len(d) == 3 and set(d) == {0, 1} for d in small)

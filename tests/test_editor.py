"""code_edit.editor: base weights bit-identical after every trained method, the LoRA really trained and
really removed, per-stage times and memory recorded, InContext prompts carry the articles, the
baselines' training pairs, method aliases, and batch-mode units following docs/method.md 3.7."""
from types import SimpleNamespace

import pytest
import torch

from code_edit.config import load_hparams
from code_edit.data import edit_requests
from code_edit.editor import Editor, in_context_answer_fn, normalize_method
from code_edit.run_folder import plan_units
from eval.probes import CE_PREFIX, build_probes
from model import load_model, load_tokenizer
from model.lora import has_lora
from test_editor_fixtures import case, dataset, rewrite, write_hparams


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu"), load_tokenizer("tiny-random")


def fake_answers(prompts):
    return ["The answer now is Globex." for _ in prompts]


@pytest.mark.parametrize("method", ["CausalEdit", "LoRA", "CaKE"])
def test_base_weights_bit_identical_after_a_case(tiny, tmp_path, method, monkeypatch):
    model, tok = tiny
    cfg = load_hparams(write_hparams(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_lora = []
    ed = Editor(model, tok, cfg, method, model_id="tiny-random", cache_dir=tmp_path / "cache",
                adapters_dir=tmp_path / "adapters", answer_fn=lambda ps: seen_lora.append(has_lora(model)) or
                fake_answers(ps))
    c = dataset()[0]
    records = ed.run_unit("case-1", edit_requests(c), [c])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not has_lora(model) and not any(p.requires_grad for p in model.parameters())
    assert seen_lora and all(seen_lora)  # evaluation ran on the edited (adapted) model
    (rec,) = records
    assert rec["case_id"] == 1 and rec["method"] == method and rec["unit"] == "case-1"
    stats = rec["edit_stats"]
    assert stats["sft"]["steps"] >= 1
    if method == "CausalEdit":
        assert stats["bootstrap"]["replicas"] == cfg.bootstrap.replica_times
        assert stats["internalize"]["steps"] == cfg.internalize.max_steps_base
        assert list(rec["stages"]) == ["bootstrap", "sft", "internalize", "eval"]
    else:
        assert list(rec["stages"]) == ["sft", "eval"]
    for st in rec["stages"].values():
        assert st["seconds"] >= 0 and st["peak_gpu_mem_bytes"] == 0  # CPU
    assert rec["time"] == pytest.approx(sum(v["seconds"] for k, v in rec["stages"].items() if k != "eval"), abs=0.01)
    from safetensors.torch import load_file  # the saved adapter is a trained one (B starts at zero)
    saved = load_file(tmp_path / "adapters" / "case-1" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())


def test_failure_mid_edit_still_removes_the_adapter(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = load_hparams(write_hparams(tmp_path))
    import code_edit.editor as E

    monkeypatch.setattr(E, "internalize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(E, "bootstrap", lambda *a, **k: SimpleNamespace(examples=[], stats={}, sft={}))
    ed = Editor(model, tok, cfg, "CausalEdit", model_id="m", answer_fn=fake_answers)
    c = dataset()[1]
    with pytest.raises(RuntimeError, match="boom"):
        ed.run_unit("case-2", edit_requests(c), [c])
    assert not has_lora(model)


def test_baseline_training_pairs(tiny, tmp_path, monkeypatch, caplog):
    model, tok = tiny
    cfg = load_hparams(write_hparams(tmp_path))
    got = {}

    def fake_sft(model_, examples, params, scfg, log=None):
        got["examples"], got["cfg"] = examples, scfg
        return {"steps": 1, "final_loss": 0.0}

    monkeypatch.setattr("train.sft.sft", fake_sft)

    def texts():
        return [(tok.decode(p, False), tok.decode(c, False)) for p, c in got["examples"]]

    c1 = dataset()[0]  # one rephrase + one learning prompt
    Editor(model, tok, cfg, "cake", model_id="m", answer_fn=fake_answers).run_unit("case-1", edit_requests(c1), [c1])
    assert [t[1] for t in texts()] == ["Globex<|im_end|>", "Globex<|im_end|>", "Paris.<|im_end|>"]
    assert "Acme is owned by ?" in texts()[0][0] and "Which company owns Acme now? (0)" in texts()[1][0]
    assert (got["cfg"].lr, got["cfg"].epochs, got["cfg"].batch_size) == (1e-4, cfg.baseline_cake.epochs,
                                                                        cfg.baseline_cake.batch_size)
    assert got["cfg"].stop_loss is None
    c2 = dataset()[1]  # no CaKE prompts (like MQuAKE-hard): question + cloze, with a warning
    with caplog.at_level("WARNING"):
        Editor(model, tok, cfg, "CaKE", model_id="m", answer_fn=fake_answers).run_unit("case-2", edit_requests(c2), [c2])
    assert any("no rephrase/learning prompts" in m for m in caplog.messages)
    assert len(got["examples"]) == 2 and all(t[1] == "Stark<|im_end|>" for t in texts())
    Editor(model, tok, cfg, "LoRA", model_id="m", answer_fn=fake_answers).run_unit("case-2", edit_requests(c2), [c2])
    assert [t[0].split("user\n")[1].split("<|im_end|>")[0] for t in texts()] == ["Who owns Umbrella?",
                                                                                  "Umbrella is owned by ?"]
    assert (got["cfg"].lr, got["cfg"].epochs, got["cfg"].batch_size) == (5e-3, cfg.baseline_lora.epochs, 1)
    assert not has_lora(model)


def test_in_context_prompts_carry_every_article():
    c = case(9, [rewrite("Acme", "Globex", "Initech"), rewrite("Umbrella", "Stark", "Wayne")])
    asked = []
    fn = in_context_answer_fn(lambda ps: asked.extend(ps) or ["x"] * len(ps), c)
    fn(["Now, who? Let's think step by step."])
    a1, a2 = (rw["article"] for rw in c["requested_rewrite"])
    assert asked == [f"{CE_PREFIX}\n\n{a1}\n\n{a2}\n\nNow, who? Let's think step by step."]
    c["requested_rewrite"][1]["article"] = None
    with pytest.raises(ValueError, match="case_id 9"):
        in_context_answer_fn(lambda ps: ps, c)


def test_in_context_and_pre_edited_do_not_train(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = load_hparams(write_hparams(tmp_path))
    monkeypatch.setattr("train.sft.sft", lambda *a, **k: pytest.fail("no training expected"))
    c = dataset()[0]
    asked = []
    rec = Editor(model, tok, cfg, "InContext", model_id="m",
                 answer_fn=lambda ps: asked.extend(ps) or fake_answers(ps)).run_unit("case-1", edit_requests(c), [c])[0]
    assert asked and all(p.startswith(CE_PREFIX) for p in asked)
    assert len(asked) == len({p.prompt for p in build_probes(c)})
    assert list(rec["stages"]) == ["eval"] and rec["time"] == 0
    # the stored prompts are the plain probe prompts
    assert rec["post"]["hop_wise_pred"][0][0]["prompt"].startswith("Now, ")
    rec = Editor(model, tok, cfg, "pre-edited", model_id="m", answer_fn=fake_answers).run_unit(
        "case-1", edit_requests(c), [c])[0]
    assert rec["method"] == "PreEdited" and not has_lora(model)


def test_method_aliases():
    assert [normalize_method(m) for m in ("causaledit", "CausalEdit", "LoRA", "cake", "Pre-Edited", "icl")] == \
        ["CausalEdit", "CausalEdit", "LoRA", "CaKE", "PreEdited", "InContext"]
    with pytest.raises(ValueError, match="ROME is a baseline of the reference"):
        normalize_method("rome")
    with pytest.raises(ValueError, match="unknown"):
        normalize_method("magic")


def test_batch_units_follow_method_3_7():
    """Hand-built: unique edits by (subject, relation, target_new) in case order, whole cases, cut to a
    multiple of N, groups of N, each evaluated on every contributing case."""
    cases = dataset()  # edits: c1 Acme, c2 Umbrella, c3 Tyrell + Acme(dup), c4 Hooli
    units = plan_units(cases, 2)
    assert [u.key for u in units] == ["group-1", "group-2"]
    assert [[(r.case_id, r.rewrite_idx, r.subject) for r in u.requests] for u in units] == \
        [[(1, 0, "Acme"), (2, 0, "Umbrella")], [(3, 0, "Tyrell"), (4, 0, "Hooli")]]
    assert [[c["case_id"] for c in u.cases] for u in units] == [[1, 2], [3, 4]]
    assert [u.group for u in units] == [1, 2]
    three = plan_units(cases, 3)  # 4 unique edits -> one group of 3, Hooli dropped
    assert len(three) == 1 and [c["case_id"] for c in three[0].cases] == [1, 2, 3]
    single = plan_units(cases, 0)
    assert [u.key for u in single] == ["case-1", "case-2", "case-3", "case-4"]
    assert [len(u.requests) for u in single] == [1, 1, 2, 1]  # all rewrites of a case edited jointly


def test_training_log_keeps_small_learning_rates(caplog):
    from code_edit.editor import _every
    with caplog.at_level("INFO", logger="code_edit.editor"):
        cb = _every(10, "sft")
        cb({"step": 10, "lr": 3e-5, "loss": 1.234567})
        cb({"step": 11, "lr": 1.0})  # not a multiple of 10: not logged
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "'lr': 3e-05" in msg and "'loss': 1.235" in msg

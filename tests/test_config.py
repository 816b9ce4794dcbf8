"""code_edit.config: every preset loads with docs/method.md 3.1 / 8.2 values; bad files fail naming the key and file."""
import dataclasses
import json
from pathlib import Path

import pytest

from code_edit.config import HPARAMS_DIR, CausalEditConfig, HparamsError, load_hparams, preset_names, upgrade_hparams

# The reference values, typed in from docs/method.md 3.1, 3.2, 3.5, 4.1 and 8.2 (not read from our presets).
PAPER = {
    "editing_mode": "causal",
    "student_use_sft": True,
    "teacher_use_sft": False,
    "lora.rank": 12,
    "lora.alpha": 24.0,
    "lora.dropout": 0.05,
    "lora.target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "lora.init_seed": 3407,
    "model.max_seq_len": 1536,
    "bootstrap.epochs": 125,
    "bootstrap.learning_rate": 3e-5,
    "bootstrap.batch_size": 12,
    "bootstrap.grad_accum": 1,
    "bootstrap.num_samples": 48,
    "bootstrap.replica_times": 25,
    "bootstrap.temperature": 0.9,
    "bootstrap.top_p": 0.95,
    "bootstrap.lr_scheduler": "cosine",
    "bootstrap.warmup_ratio": 0.1,
    "bootstrap.max_grad_norm": 0.1,
    "bootstrap.early_stop_loss": 0.35,
    "bootstrap.early_stop_consecutive": 2,
    "bootstrap.min_thought_words": 5,
    "bootstrap.noncausal_max_rounds": 3,
    "bootstrap.seed": 3407,
    "internalize.max_steps": 0,
    "internalize.max_steps_base": 20,
    "internalize.max_steps_per_extra_edit": 5,
    "internalize.cake_data": False,
    "internalize.data_replica_times": 1,
    "internalize.learning_rate": 9e-5,
    "internalize.lr_scheduler": "constant_with_warmup",
    "internalize.warmup_ratio": 0.2,
    "internalize.max_grad_norm": 0.5,
    "internalize.prompts_per_step": 4,
    "internalize.rollouts_per_prompt": 9,
    "internalize.micro_batches": 2,
    "internalize.temperature": 1.0,
    "internalize.top_p": 0.9,
    "internalize.max_completion_length": 180,
    "internalize.direction": "forward",
    "internalize.kd_temperature": 1.0,
    "internalize.top_k_support": 24,
    "internalize.seq_weight_temperature": 1.0,
    "internalize.repetition_ngram_n": 3,
    "internalize.repetition_window": 48,
    "internalize.repetition_threshold": 0.15,
    "eval.temperature": 0.0,
    "eval.max_new_tokens": 768,
    "eval.repetition_penalty": 1.1,
    "baseline_lora.rank": 8,
    "baseline_lora.alpha": 32.0,
    "baseline_lora.dropout": 0.1,
    "baseline_lora.target_modules": ("q_proj", "v_proj"),
    "baseline_lora.epochs": 60,
    "baseline_lora.batch_size": 1,
    "baseline_lora.learning_rate": 5e-3,
    "baseline_lora.weight_decay": 0.0,
    "baseline_lora.max_length": 128,
    "baseline_cake.rank": 8,
    "baseline_cake.alpha": 32.0,
    "baseline_cake.dropout": 0.05,
    "baseline_cake.target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "baseline_cake.epochs": 40,
    "baseline_cake.batch_size": 4,
    "baseline_cake.learning_rate": 1e-4,
    "baseline_cake.max_length": 256,
}

# Differences from PAPER per preset (docs/method.md 3.1 "YAML files" and the issue).
VARIANTS = {
    "qwen2.5-7b-instruct": {},
    "qwen2.5-7b-instruct_cake": {"internalize.max_steps_base": 35, "internalize.cake_data": True},
    "qwen2.5-7b-instruct_noncausal": {"editing_mode": "noncausal"},
    "qwen2.5-7b-instruct_reversekl": {"internalize.direction": "reverse"},
    "llama3.1-8b-instruct": {"internalize.learning_rate": 1.1e-4},
    "llama3.1-8b-instruct_cake": {"internalize.learning_rate": 1.1e-4, "internalize.max_steps_base": 35,
                                  "internalize.cake_data": True},
    "llama3.1-8b-instruct_noncausal": {"internalize.learning_rate": 1.1e-4, "editing_mode": "noncausal"},
    "llama3.1-8b-instruct_reversekl": {"internalize.learning_rate": 1.1e-4, "internalize.direction": "reverse"},
    "smollm2-135m-instruct": {},
    "smollm2-135m-instruct_edit": {"bootstrap.learning_rate": 1e-3, "internalize.teacher_answer_line": True},
}
SOURCES = {"qwen": "Qwen/Qwen2.5-7B-Instruct", "llama": "meta-llama/Llama-3.1-8B-Instruct",
           "smollm2": "smollm2-135m-instruct"}


def get(cfg, dotted):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_preset_list():
    assert set(preset_names()) == set(VARIANTS) | {"tiny", "demo"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_preset_matches_method(name):
    cfg = load_hparams(name)
    expected = {**PAPER, **VARIANTS[name]}
    for key, want in expected.items():
        got = get(cfg, key)
        assert got == want and type(got) is type(want), f"{name}: {key} = {got!r}, want {want!r}"
    family = next(f for f in SOURCES if name.startswith(f))
    assert cfg.model.source == SOURCES[family]
    assert cfg.model.dtype == "bfloat16"
    assert cfg.name == name


def test_rollout_batch_matches_reference_grpo_semantics():
    it = load_hparams("qwen2.5-7b-instruct").internalize
    # per_device_train_batch_size 18 x gradient_accumulation_steps 2 completions, num_generations 9
    assert it.prompts_per_step * it.rollouts_per_prompt == 18 * 2
    assert it.rollouts_per_prompt == 9
    assert it.prompts_per_step * it.rollouts_per_prompt // it.micro_batches == 18


def test_tiny_is_small_and_otherwise_paper():
    tiny, paper = load_hparams("tiny"), load_hparams("qwen2.5-7b-instruct")
    assert tiny.model.source == "tiny-random" and tiny.model.dtype == "float32"
    b, i = tiny.bootstrap, tiny.internalize
    assert b.replica_times * b.num_samples <= 16 and b.max_new_tokens <= 64 and b.epochs <= 2
    assert i.max_steps_base <= 2 and i.prompts_per_step * i.rollouts_per_prompt <= 4
    assert tiny.eval.max_new_tokens <= 32
    # values not about size stay the paper's
    assert (tiny.editing_mode, i.direction, i.learning_rate, b.learning_rate) == \
        (paper.editing_mode, paper.internalize.direction, paper.internalize.learning_rate, paper.bootstrap.learning_rate)


def test_config_is_frozen_and_serialisable():
    cfg = load_hparams("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.editing_mode = "noncausal"
    d = cfg.to_dict()
    assert d["internalize"]["direction"] == "forward" and d["lora"]["target_modules"][0] == "q_proj"


def write(tmp_path, text, name="custom.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_file_extends_a_preset(tmp_path):
    p = write(tmp_path, 'extends = "qwen2.5-7b-instruct"\n[internalize]\nlearning_rate = 1e-4\nmax_steps = 7\n')
    cfg = load_hparams(p)
    assert cfg.internalize.learning_rate == 1e-4 and cfg.internalize.max_steps == 7
    assert cfg.bootstrap.num_samples == 48 and cfg.name == "custom"
    # relative path in extends is resolved against the file's folder; ints are accepted for floats
    write(tmp_path, 'extends = "custom.toml"\n[lora]\nalpha = 30\n', name="child.toml")
    child = load_hparams(tmp_path / "child.toml")
    assert child.lora.alpha == 30.0 and isinstance(child.lora.alpha, float) and child.internalize.max_steps == 7


def test_full_copy_of_a_preset_loads_standalone(tmp_path):
    text = (HPARAMS_DIR / "qwen2.5-7b-instruct.toml").read_text()
    assert load_hparams(write(tmp_path, text)) == load_hparams("qwen2.5-7b-instruct")


@pytest.mark.parametrize("body, key", [
    ('extends = "tiny"\nlearning_rate = 1.0\n', "learning_rate"),
    ('extends = "tiny"\n[internalize]\nlearnin_rate = 1.0\n', "internalize.learnin_rate"),
    ('extends = "tiny"\n[stage3]\nx = 1\n', "stage3"),
])
def test_unknown_key_names_key_and_file(tmp_path, body, key):
    p = write(tmp_path, body)
    with pytest.raises(HparamsError) as e:
        load_hparams(p)
    assert repr(key) in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("line, key", [
    ('[internalize]\nmax_steps_base = "20"', "internalize.max_steps_base"),
    ('[internalize]\nmax_steps_base = 20.5', "internalize.max_steps_base"),
    ('[internalize]\nmax_steps_base = true', "internalize.max_steps_base"),
    ('[internalize]\ncake_data = 1', "internalize.cake_data"),
    ('[bootstrap]\nlearning_rate = "3e-5"', "bootstrap.learning_rate"),
    ('[lora]\ntarget_modules = "q_proj"', "lora.target_modules"),
    ('[lora]\ntarget_modules = [1, 2]', "lora.target_modules"),
    ('editing_mode = "causual"', "editing_mode"),
    ('[internalize]\ndirection = "backward"', "internalize.direction"),
    ('[model]\ndtype = "fp8"', "model.dtype"),
    ('[model]\ngrad_checkpointing = "sometimes"', "model.grad_checkpointing"),
    ('[model]\ngrad_checkpointing = 1', "model.grad_checkpointing"),
    ('[bootstrap]\ntop_p = 1.5', "bootstrap.top_p"),
    ('[bootstrap]\nnum_samples = 0', "bootstrap.num_samples"),
    ('[optimizer]\nadam_beta2 = 1.0', "optimizer.adam_beta2"),  # AdamW refuses it, far later and unnamed
    ("model = 3", "model"),
])
def test_wrong_type_or_value_names_key_and_file(tmp_path, line, key):
    p = write(tmp_path, 'extends = "tiny"\n' + line + "\n")
    with pytest.raises(HparamsError) as e:
        load_hparams(p)
    assert repr(key) in str(e.value) and str(p) in str(e.value)


def test_missing_key_names_key(tmp_path):
    text = (HPARAMS_DIR / "qwen2.5-7b-instruct.toml").read_text().replace("kd_temperature = 1.0\n", "")
    p = write(tmp_path, text)
    with pytest.raises(HparamsError, match=r"missing key 'internalize.kd_temperature'") as e:
        load_hparams(p)
    assert str(p) in str(e.value)


def test_cross_field_rules(tmp_path):
    p = write(tmp_path, 'extends = "tiny"\nteacher_use_sft = true\nstudent_use_sft = false\n')
    with pytest.raises(HparamsError, match="teacher_use_sft"):
        load_hparams(p)
    p = write(tmp_path, 'extends = "qwen2.5-7b-instruct"\n[internalize]\nprompts_per_step = 3\n')
    with pytest.raises(HparamsError, match="'internalize.prompts_per_step'"):
        load_hparams(p)


def test_bad_references(tmp_path):
    with pytest.raises(HparamsError, match="unknown preset 'qwen3-7b'"):
        load_hparams("qwen3-7b")
    with pytest.raises(HparamsError, match="not found"):
        load_hparams(tmp_path / "nope.toml")
    p = write(tmp_path, 'extends = "no-such-preset"\n')
    with pytest.raises(HparamsError, match="no-such-preset"):
        load_hparams(p)
    write(tmp_path, 'extends = "b.toml"\n', name="a.toml")
    write(tmp_path, 'extends = "a.toml"\n', name="b.toml")
    with pytest.raises(HparamsError, match="cycle"):
        load_hparams(tmp_path / "a.toml")
    p = write(tmp_path, "[internalize\n")
    with pytest.raises(HparamsError, match="invalid TOML") as e:
        load_hparams(p)
    assert str(p) in str(e.value)


def test_config_type_is_exported():
    assert isinstance(load_hparams("smollm2-135m-instruct"), CausalEditConfig)


TEACHER_KEYS = {"teacher_form": "system_sheet", "teacher_articles": "own", "teacher_answer_line": False}


@pytest.mark.parametrize("name", sorted(json.loads((Path(__file__).parent / "data" / "presets_before_e2.json")
                                        .read_text())))
def test_presets_resolve_to_their_values_before_the_teacher_keys(name):
    """Every preset of 2026-12-03 (tests/data/presets_before_e2.json, written from the code of that day)
    resolves to exactly those values; the teacher-prompt keys added since take the paper's behaviour."""
    before = json.loads((Path(__file__).parent / "data" / "presets_before_e2.json").read_text())[name]
    now = json.loads(json.dumps(load_hparams(name).to_dict()))  # tuples -> lists, as in the file
    # demo (CPU `make demo`) now extends the embedded model's edit preset, whose teacher has the answer line
    want = {**TEACHER_KEYS, "teacher_answer_line": True} if name == "demo" else TEACHER_KEYS
    assert {k: v for k, v in now["internalize"].items() if k in TEACHER_KEYS} == want
    upgraded = upgrade_hparams(before)  # what a run folder of that day resumes as
    if name == "demo":
        upgraded["internalize"]["teacher_answer_line"] = True
    if before["model"]["grad_checkpointing"] is True:  # the 7-8B presets say "auto" now
        assert now["model"]["grad_checkpointing"] == "auto"
        now["model"]["grad_checkpointing"] = True
    assert upgraded == now
    # the hand-made reading of the same: removed keys as they were that day, the renamed one, the added ones
    for key in ("importance_sampling", "importance_sampling_cap", "disable_dropout", "seed"):
        now["internalize"][key] = before["internalize"][key]
    now["baseline_lora"]["num_steps"] = now["baseline_lora"].pop("epochs")
    now["internalize"] = {k: v for k, v in now["internalize"].items() if k not in TEACHER_KEYS}
    assert now == before


def test_a_run_folder_from_before_the_key_changes_resumes(tmp_path):
    from code_edit.run_folder import choose_run_dir
    before = json.loads((Path(__file__).parent / "data" / "presets_before_e2.json").read_text())["tiny"]
    now = json.loads(json.dumps(load_hparams("tiny").to_dict()))
    d = tmp_path / "n1_seed70_x"
    (d / "meta").mkdir(parents=True)
    args = {"editing_method": "CausalEdit", "datatype": "MQuAKE-hard", "max_cases": 1}
    (d / "meta" / "run_args.json").write_text(json.dumps(args))
    (d / "meta" / "run_info.json").write_text(json.dumps({"hparams": before}))
    assert choose_run_dir(tmp_path, "n1_seed70_", "x", args, now) == (d, True)
    changed = json.loads(json.dumps(now))
    changed["internalize"]["learning_rate"] = 1.0
    with pytest.raises(Exception, match="hparams differ"):
        choose_run_dir(tmp_path, "n1_seed70_", "x", args, changed)


@pytest.mark.parametrize("line, says", [
    ("[internalize]\nimportance_sampling = true", "importance ratio"),
    ("[internalize]\nseed = 1", "derives from the unit"),
    ("[internalize]\ndisable_dropout = true", "dropout off"),
    ("[baseline_lora]\nnum_steps = 3", "renamed to baseline_lora.epochs"),
])
def test_removed_keys_say_so(tmp_path, line, says):
    p = tmp_path / "x.toml"
    p.write_text(f'extends = "tiny"\n{line}\n')
    with pytest.raises(HparamsError, match=says):
        load_hparams(p)


@pytest.mark.parametrize("line", ['teacher_form = "article"', 'teacher_articles = "all"', "teacher_answer_line = 1"])
def test_teacher_keys_are_checked(tmp_path, line):
    p = tmp_path / "x.toml"
    p.write_text(f'extends = "tiny"\n[internalize]\n{line}\n')
    with pytest.raises(HparamsError, match=line.split()[0]):
        load_hparams(p)


def test_grad_checkpointing_takes_a_bool_or_auto(tmp_path):
    assert load_hparams("qwen2.5-7b-instruct").model.grad_checkpointing == "auto"  # train/memory.py decides
    assert load_hparams("llama3.1-8b-instruct").model.grad_checkpointing == "auto"
    assert load_hparams("smollm2-135m-instruct").model.grad_checkpointing is False
    p = write(tmp_path, 'extends = "tiny"\n[model]\ngrad_checkpointing = true\n')
    assert load_hparams(p).model.grad_checkpointing is True

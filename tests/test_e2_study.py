"""Issue E2's study arms: each resolves, and changes only the keys the study varies; the report joins an
arm's run folders case by case."""
import dataclasses
import json
import sys
from pathlib import Path

from code_edit.config import load_hparams

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import e2_study  # noqa: E402

STUDIED = {"bootstrap.learning_rate", "internalize.teacher_form", "internalize.teacher_articles",
           "internalize.teacher_answer_line", "internalize.max_steps_base", "internalize.max_steps_per_extra_edit"}


def test_arms_change_only_studied_keys():
    paper = e2_study.flat_keys(dataclasses.asdict(load_hparams("smollm2-135m-instruct")))
    arms = sorted((ROOT / "bench" / "study" / "e2").glob("*.toml"))
    assert len(arms) >= 7
    changed = {}
    for path in arms:
        arm = e2_study.flat_keys(dataclasses.asdict(load_hparams(path)))
        diff = {k for k in paper if arm[k] != paper[k] and k != "name"}
        assert diff and diff <= STUDIED, (path.name, diff)
        changed[path.stem] = diff
    assert changed["answer-line"] == {"internalize.teacher_answer_line"}
    assert changed["sft-lr"] == {"bootstrap.learning_rate"}
    assert changed["sft-lr_answer-line_case"] == {"bootstrap.learning_rate", "internalize.teacher_answer_line",
                                                   "internalize.teacher_articles"}


def test_edit_preset_is_the_chosen_arm():
    """smollm2-135m-instruct_edit is the arm chosen on the development split (docs/e2_study.md), key for key."""
    preset = dataclasses.asdict(load_hparams("smollm2-135m-instruct_edit"))
    arm = dataclasses.asdict(load_hparams(ROOT / "bench" / "study" / "e2" / "sft-lr_answer-line.toml"))
    def named_off(d):
        return {k: v for k, v in e2_study.flat_keys(d).items() if k != "name"}
    assert named_off(preset) == named_off(arm)


def test_arm_argv_selects_the_asked_cases():
    from code_edit.data import order_cases
    cases = [{"case_id": i, "new_single_hops": [{}] * (2 + i % 3)} for i in range(30)]
    get = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    whole = [c["case_id"] for c in order_cases(cases, max_cases=20)]

    def picked(argv):
        return [c["case_id"] for c in order_cases(cases, max_cases=int(get(argv, "--max_cases")),
                                                  skip_cases=int(get(argv, "--skip_cases")))]
    first, second = e2_study.arm_argv("sft-lr", 10), e2_study.arm_argv("sft-lr", 10, skip=10)
    assert picked(first) == whole[:10] and picked(second) == whole[10:20]
    assert picked(e2_study.arm_argv("sft-lr", 3, skip=14)) == whole[14:17]
    assert get(first, "--run_id") != get(second, "--run_id")


def test_parse_runs_ranges_and_errors():
    assert e2_study.parse_runs("a,b:10:4,a:14:3", 10, 0) == [("a", 0, 10), ("b", 10, 4), ("a", 14, 3)]
    for bad in ("a:10", "a:x:3", "a:1:2:3"):
        try:
            e2_study.parse_runs(bad, 10, 0)
        except ValueError as e:
            assert bad in str(e)
        else:
            raise AssertionError(bad)


def test_dev_records_join_folders_in_case_order(tmp_path):
    def write(name, ids, tag):
        d = tmp_path / "tag-T0_S1" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps([{"case_id": i, "from": tag} for i in ids]))
    write("n10_seed70_study", [5, 3, 9], "dev")
    write("n10_seed70_study-skip10", [8, 7], "rest")
    (tmp_path / "tag-T0_S1" / "n5_seed71_other").mkdir()  # another seed: never read
    recs = e2_study.dev_records(tmp_path, [7, 9, 5, 4])
    assert [(r["case_id"], r["from"]) for r in recs] == [(7, "rest"), (9, "dev"), (5, "dev")]
    write("n2_seed70_study-skip8", [9], "again")  # a case in two folders: which one counts must not be guessed
    try:
        e2_study.dev_records(tmp_path, [9])
    except ValueError as e:
        assert "case 9" in str(e) and "skip8" in str(e)
    else:
        raise AssertionError("a case held by two folders was accepted")


def test_parse_combos():
    assert e2_study.parse_combos("system_sheet:own,in_context:case:answer-line") == [
        ("system_sheet", "own", False), ("in_context", "case", True)]
    for bad in ("system_sheet:own:answer_line", "system_sheet", "sheet:own", "in_context:all"):
        try:
            e2_study.parse_combos(bad)
        except ValueError as e:
            assert repr(bad) in str(e)
        else:
            raise AssertionError(bad)


def test_teacher_agreement_counts(tmp_path, monkeypatch):
    """Two probes by hand: the teacher states the new answer on both, the student on one and the old on the
    other -> agreement 1/2, teacher new 2/2, student new where teacher new 1/2."""
    monkeypatch.setattr(e2_study, "STUDY", tmp_path)
    q1, q2 = "Now, Who created X? Let's think step by step.", "Now, Who made X? Let's think step by step."
    rows = [{"case_id": 1, "prompt": q, "refs": ["Alice"], "old_refs": ["Bob"], "pred": "The answer now is Alice."}
            for q in (q1, q2)]
    e2_study.teacher_file("system_sheet", "own", True).write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {"case_id": 1, "post": {"hop_wise_pred": [[{"prompt": q1, "pred": "The answer is Alice.", "ref": ["Alice"]},
                                                    {"prompt": q2, "pred": "The answer is Bob.", "ref": ["Alice"]}]]}}
    got = e2_study.teacher_agreement([rec], "system_sheet", "own", True)
    assert got == {"probes": 2, "agree": 0.5, "teacher_new": 1.0, "student_new_where_teacher_new": 0.5}
    assert e2_study.teacher_agreement([rec], "in_context", "own", False) is None  # no teacher file


def _arm_folder(root, name, units, hparams, skip=None):
    """A study range folder holding `units` (code_edit.run_folder.Unit) as finished cases."""
    from eval.files import append_jsonl, atomic_write_json
    d = root / "study" / "MQuAKE-hard" / "arm" / "CausalEdit" / "tag-T0_S1" / name
    atomic_write_json(d / "meta" / "run_info.json", {"hparams": hparams, "eval_generation": {}, "started_at": "t0",
                                                     "device_name": "GPU-X"})
    post = {"hop_wise": [[True]], "accuracy": [False], "hop_wise_pred": [], "accuracy_pred": []}
    append_jsonl(d / "metrics.jsonl", [{"unit": u.key, "case_id": u.cases[0]["case_id"],
                                        "record": {"case_id": u.cases[0]["case_id"], "post": post, "stages": {}}}
                                       for u in units])
    return d


def test_assemble_joins_the_arm_into_the_presets_run(tmp_path, monkeypatch):
    from code_edit.__main__ import build_parser
    from code_edit.run import prepare
    from code_edit.run_folder import RunError
    monkeypatch.setattr(e2_study, "ROOT", tmp_path)
    monkeypatch.setattr(e2_study, "STATE", tmp_path)
    monkeypatch.setattr(e2_study, "STUDY", tmp_path / "study")
    preset = "smollm2-135m-instruct_edit"
    units = prepare(build_parser().parse_args(["--editing_method", "CausalEdit", "--datatype", "MQuAKE-hard",
                                               "--model_type", preset, "--max_cases", "20", "--articles_only"])).units
    hp = json.loads(json.dumps(load_hparams(preset).to_dict()))
    old_form = {**hp, "name": "arm", "internalize": {**hp["internalize"], "seed": 42}}  # a key S1 removed
    _arm_folder(tmp_path, "n10_seed70_study", units[:12], old_form)
    try:
        e2_study.assemble("arm", preset)
    except RunError as e:  # cases 13-20 are missing: named
        assert units[12].key in str(e) and "arm" in str(e)
    else:
        raise AssertionError("assembled without cases 13-20")
    bad = {**hp, "internalize": {**hp["internalize"], "teacher_answer_line": False}}
    _arm_folder(tmp_path, "n8_seed70_study-skip12", units[12:], bad)
    try:
        e2_study.assemble("arm", preset)
    except RunError as e:
        assert "internalize.teacher_answer_line" in str(e) and "skip12" in str(e)
    else:
        raise AssertionError("assembled from a folder of another config")
    (tmp_path / "study" / "MQuAKE-hard" / "arm" / "CausalEdit" / "tag-T0_S1" / "n8_seed70_study-skip12" / "meta" /
     "run_info.json").write_text(json.dumps({"hparams": hp}))
    out = e2_study.assemble("arm", preset)
    assert out == tmp_path / "results" / "MQuAKE-hard" / preset / "CausalEdit" / "tag-T0_S1" / "n20_seed70_results"
    info = json.loads((out / "meta" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["units_done"] == 20 and len(info["assembled_from"]) == 2
    assert [r["case_id"] for r in json.loads((out / "metrics.json").read_text())] == \
        [u.cases[0]["case_id"] for u in units]
    try:
        e2_study.assemble("arm", preset)  # never over an existing journal
    except RunError as e:
        assert "already holds a journal" in str(e)
    else:
        raise AssertionError("assembled twice")

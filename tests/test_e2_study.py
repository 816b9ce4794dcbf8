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


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_arms_change_only_studied_keys():
    paper = flat(dataclasses.asdict(load_hparams("smollm2-135m-instruct")))
    arms = sorted((ROOT / "bench" / "study" / "e2").glob("*.toml"))
    assert len(arms) >= 7
    changed = {}
    for path in arms:
        arm = flat(dataclasses.asdict(load_hparams(path)))
        diff = {k for k in paper if arm[k] != paper[k] and k != "name"}
        assert diff and diff <= STUDIED, (path.name, diff)
        changed[path.stem] = diff
    assert changed["answer-line"] == {"internalize.teacher_answer_line"}
    assert changed["sft-lr"] == {"bootstrap.learning_rate"}
    assert changed["sft-lr_answer-line_case"] == {"bootstrap.learning_rate", "internalize.teacher_answer_line",
                                                   "internalize.teacher_articles"}


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
    write("n10_seed70_study-skip10", [9, 7], "rest")  # 9 also in the first folder: the first one gives it
    (tmp_path / "tag-T0_S1" / "n5_seed71_other").mkdir()  # another seed: never read
    recs = e2_study.dev_records(tmp_path, [7, 9, 5, 4])
    assert [(r["case_id"], r["from"]) for r in recs] == [(7, "rest"), (9, "dev"), (5, "dev")]

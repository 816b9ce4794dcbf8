"""scripts/results.py end to end on CPU (--small, one method): the run, both offline rules, and RESULTS.md's
rows checked against the files they come from."""
import importlib.util
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    """scripts/results.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_small(tmp_path, capsys):
    mod = _script()
    out = tmp_path / "RESULTS.md"
    common = ["--small", "--methods", "PreEdited", "--output_root", str(tmp_path / "runs"), "--results", str(out)]
    assert mod.main(common + ["--runs-only"]) == 0  # the edits (on a GPU, say) without grading or report
    run = next((tmp_path / "runs").glob("MQuAKE-hard/tiny/PreEdited/*/*_results"))
    assert (run / "metrics.json").exists() and not (run / "results").exists() and not out.exists()
    assert mod.main(common) == 0  # elsewhere: resumes the finished run, grades it, writes the report
    text = out.read_text()
    assert len(list((tmp_path / "runs").glob("MQuAKE-hard/tiny/PreEdited/*/*_results"))) == 1
    assert "edits ran on cpu" in text
    assert "- PreEdited: `python -m code_edit --editing_method PreEdited --datatype MQuAKE-hard" in text
    strict = json.loads((run / "results" / "strict" / "judge_summary.json").read_text())
    sub = json.loads((run / "results" / "substring" / "judge_summary.json").read_text())
    an = json.loads((run / "results" / "strict" / "pred_analysis.json").read_text())
    assert strict["judge"] == "strict" and sub["judge"] == "substring" and an["judge"] == "strict"
    assert strict["items"]["total"] == sub["items"]["total"] > 0
    rows = [line for line in text.splitlines() if line.startswith("| PreEdited |")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"
    records = json.loads((run / "metrics.json").read_text())
    # answer lengths from the records' hop-wise and multi-hop answers, counted here with statistics.median
    words = [len(p["pred"].split()) for r in records for hop in r["post"]["hop_wise_pred"] for p in hop]
    words += [len(p["pred"].split()) for r in records for p in r["post"]["accuracy_pred"]]
    assert len(words) == strict["items"]["total"]  # the graded answers, one each
    srr, asserted = an["summary"]["SRR"], an["summary"]["asserted_rewrites"]
    assert cells == ["PreEdited", "1", pct(strict["overall_hop_wise_average"]),
                     pct(strict["accuracy_averages"]["any_right_accuracy"]), pct(srr["rate"]),
                     f"{asserted['yes']} of {asserted['total']}",
                     pct(strict["items"]["asserts_old"] / strict["items"]["total"]),
                     f"{statistics.median(words):g}", pct(sum(w <= 5 for w in words) / len(words))]
    assert [c.strip() for c in rows[1].strip("|").split("|")] == [
        "PreEdited", pct(sub["overall_hop_wise_average"]), pct(sub["accuracy_averages"]["any_right_accuracy"])]
    eval_s = sum(r["stages"]["eval"]["seconds"] for r in records) / len(records)
    assert [c.strip() for c in rows[2].strip("|").split("|")][4] == f"{eval_s:.1f}"
    # the agreement table is eval.agreement's, on the committed hand labels
    from eval.agreement import agreement_table, judge_verdicts, load_labels
    labels = load_labels()
    first = agreement_table(labels, judge_verdicts(labels))[0]
    assert f"| strict | {first.n} | {pct(first.agree)} | {pct(first.precision)} | {pct(first.recall)} |" in text
    assert "llm:smollm2-135m-instruct:guided" in text

    # --judge-only reports the runs as they stand: one still going (here: a second case planned) says so
    req = json.loads((run / "requests.json").read_text())
    (run / "requests.json").write_text(json.dumps(req + [dict(req[0], unit="case-x", case_ids=[-1])]))
    assert mod.main(common + ["--judge-only"]) == 0
    text = out.read_text()
    assert "| PreEdited | 1 of 2 |" in text and "Not finished when this was written:** PreEdited (1 of 2 cases)" in text
    assert mod.main(["--small", "--methods", "PreEdited", "--output_root", str(tmp_path / "none"), "--results",
                     str(tmp_path / "R2.md"), "--judge-only"]) == 2  # nothing to judge: an error, no report
    assert "no metrics.json" in capsys.readouterr().err and not (tmp_path / "R2.md").exists()


def test_full_report_says_what_the_small_model_can_show():
    mod = _script()
    text = mod.report({}, model_type="smollm2-135m-instruct", small=False, argv=[])
    assert "## What a 135M model can and cannot show" in text and "Smoke run" not in text
    small = mod.report({}, model_type="tiny", small=True, argv=["--small"])
    assert "Smoke run" in small and "can and cannot show" not in small


def test_edit_devices_names_each_runs_machine(tmp_path):
    mod = _script()
    infos = {"A": {"device": "cuda:0", "device_name": "NVIDIA H200"}, "B": {"device": "cuda:0"},
             "C": {"device": "cuda:0", "device_name": "NVIDIA H200"}}
    runs = {}
    for m, info in infos.items():
        (tmp_path / m / "meta").mkdir(parents=True)
        (tmp_path / m / "meta" / "run_info.json").write_text(json.dumps(info))
        runs[m] = (tmp_path / m, [])
    assert mod.edit_devices(runs) == "A, C on NVIDIA H200; B on cuda:0 (name not recorded)"
    assert mod.edit_devices({"A": runs["A"], "C": runs["C"]}) == "NVIDIA H200"


def test_stage_table_leaves_cached_bootstraps_out_of_the_mean():
    mod = _script()
    st = lambda sec, mem: {"seconds": sec, "peak_gpu_mem_bytes": mem}  # noqa: E731
    sampled = {"stages": {"bootstrap": st(40.0, 3 * 2**30), "sft": st(60.0, 2**30)},
               "edit_stats": {"bootstrap": {"selected": 100, "from_cache": 10}}}
    cached = {"stages": {"bootstrap": st(0.1, 2**29), "sft": st(70.0, 2**30)},
              "edit_stats": {"bootstrap": {"selected": 100, "from_cache": 100}}}
    baseline = {"stages": {"eval": st(2.0, 2**30)}}
    means, peak, n = mod.stage_table([sampled, cached, baseline])
    assert means == {"bootstrap": 40.0, "sft": 65.0, "eval": 2.0} and peak == 3.0 and n == 1


def test_answer_words_counts_hop_and_multi_hop_answers():
    mod = _script()
    a = lambda text: {"prompt": "q", "ref": ["x"], "pred": text}  # noqa: E731
    rec1 = {"case_id": 1, "post": {"hop_wise_pred": [[a("Paris"), a("it is in France")],
                                                     [a("one two three four five six")]], "accuracy_pred": [a("Berlin")]}}
    rec2 = {"case_id": 2, "post": {"hop_wise_pred": [[a("")]], "accuracy_pred": []}}
    # word counts 1, 4, 6, 1, 0 -> sorted 0 1 1 4 6: median 1, four of five at most 5 words
    assert mod.answer_words([rec1, rec2]) == (1, 0.8)
    assert mod.answer_words([rec1]) == (2.5, 0.75)  # 1 1 4 6
    assert mod.answer_words([{"case_id": 3, "post": {}}]) == (None, None)


def test_causaledit_runs_at_both_presets_except_in_the_smoke_run():
    mod = _script()
    assert mod.planned_runs(["PreEdited", "CausalEdit"], small=False) == [
        ("PreEdited", "PreEdited", "smollm2-135m-instruct"),
        ("CausalEdit (paper)", "CausalEdit", "smollm2-135m-instruct"),
        ("CausalEdit (smollm2-135m-instruct_edit)", "CausalEdit", "smollm2-135m-instruct_edit")]
    assert mod.planned_runs(["CausalEdit"], small=True) == [("CausalEdit", "CausalEdit", "tiny")]
    assert mod.planned_runs(["LoRA"], small=False) == [("LoRA", "LoRA", "smollm2-135m-instruct")]


def test_reader_check_counts(tmp_path):
    mod = _script()
    rows = [(True, True, False, False), (True, False, False, False), (False, True, True, True), (False, False, False, False)]
    path = tmp_path / "check.jsonl"
    path.write_text("".join(json.dumps({"reader_label": r, "grader_correct": g, "reader_label_old": ro,
                                        "grader_asserts_old": go}) + "\n" for r, g, ro, go in rows))
    text = mod.reader_check(path)
    # by hand: correct agrees on rows 1 and 4; asserts-old on all 4; grader-only row 3, reader-only row 2
    assert "on 4 drawn at random" in text and "grader on 2 (50.0%) for correct and 4 for asserts-old" in text
    assert "credits 1 answer(s) the reader does not and misses 1 the reader credits" in text
    assert mod.reader_check(tmp_path / "none.jsonl") is None

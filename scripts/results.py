"""RESULTS.md: CODE against its baselines on the embedded model. The `smollm2-135m-instruct` preset on the
MQuAKE-hard cases that have causal articles, five methods, plus CausalEdit at the embedded model's edit preset
(`smollm2-135m-instruct_edit`, docs/e2_study.md), each run graded by the strict offline grader
(the headline) and by the reference's substring rule (for comparison), beside each judge's measured agreement
with the hand-labelled validation set (docs/grading.md).

Every step resumes (run id "results"; judge and analysis checkpoints), so the command can be repeated
after an interruption. GPU:  python scripts/results.py        CPU smoke:  python scripts/results.py --small
Edits on a GPU, judges elsewhere: `--runs-only` there, then the plain command where the run folders are;
`--judge-only` judges and reports the run folders as they stand (a run not finished shows N of M cases).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ["PreEdited", "InContext", "LoRA", "CaKE", "CausalEdit"]
JUDGES = ("strict", "substring")  # eval judge's offline rules; results/{judge}/ of each run
STAGES = ("bootstrap", "sft", "internalize", "eval")  # code_edit.editor's stage names
EDIT_PRESET = "smollm2-135m-instruct_edit"  # the embedded model's editing preset (docs/e2_study.md)
READER_CHECK = ROOT / "bench" / "runs" / "e2_reader_check.jsonl"  # a blind reader on the edit preset's answers


def planned_runs(methods: list[str], small: bool) -> list[tuple[str, str, str]]:
    """(row label, method, preset) of each run: every method at the paper preset, and CausalEdit also at the
    edit preset (not in the --small smoke run, where both would be the tiny model)."""
    paper = "tiny" if small else "smollm2-135m-instruct"
    rows = [(m, m, paper) for m in methods]
    if small or "CausalEdit" not in methods:
        return rows
    return [("CausalEdit (paper)" if m == "CausalEdit" else m, m, t) for _, m, t in rows] + [
        (f"CausalEdit ({EDIT_PRESET})", "CausalEdit", EDIT_PRESET)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny preset, 1 case, tiny-random judge")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--max_cases", type=int, default=None, help="default 20 (every case with articles); 1 with --small")
    ap.add_argument("--output_root", default="./output/results")
    ap.add_argument("--cache_dir", default=None, help="bootstrap candidate cache (python -m code_edit's default)")
    ap.add_argument("--results", default=str(ROOT / "RESULTS.md"), help="the report to write")
    ap.add_argument("--runs-only", action="store_true", help="edit and evaluate every method, then stop: no "
                    "judges, no report (judge where the run folders are copied to, with the plain command)")
    ap.add_argument("--judge-only", action="store_true", help="edit nothing: judge and report the run folders "
                    "as they stand (an unfinished run is reported with the cases it has, marked N of M)")
    a = ap.parse_args(argv)
    if a.runs_only and a.judge_only:
        ap.error("--runs-only and --judge-only exclude each other")

    from code_edit.__main__ import build_parser
    from code_edit.run import execute
    from code_edit.run_folder import RunError

    model_type = "tiny" if a.small else "smollm2-135m-instruct"
    n = a.max_cases or (1 if a.small else 20)
    runs: dict[str, tuple[Path, list[str]]] = {}
    for label, method, preset in planned_runs(a.methods, a.small):
        argv_run = ["--editing_method", method, "--datatype", "MQuAKE-hard", "--model_type", preset,
                    "--max_cases", str(n), "--output_root", a.output_root, "--run_id", "results",
                    "--articles_only"]  # every method on the same cases: the ones CausalEdit can run
        if a.small:
            argv_run += ["--device", "cpu"]
        if a.cache_dir:
            argv_run += ["--cache_dir", a.cache_dir]
        print(f"\n=== {label}: {preset} on MQuAKE-hard, {n} case(s) ===", flush=True)
        try:
            args_run = build_parser().parse_args(argv_run)
            runs[label] = (existing_run(args_run) if a.judge_only else execute(args_run), argv_run)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.runs_only:
        return 0

    for method, (run_dir, _) in runs.items():
        if judge_run(run_dir) != 0:
            return 2
    text = report(runs, model_type=model_type, small=a.small, argv=argv)
    tmp = Path(a.results + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, a.results)
    print(text)
    return 0


def existing_run(args: argparse.Namespace) -> Path:
    """The folder `execute(args)` would resume, without opening it; it must hold finished cases."""
    from code_edit.run import planned_dir, prepare
    from code_edit.run_folder import RunError

    parent, prefix = planned_dir(args, prepare(args))
    d = parent / f"{prefix}{args.run_id}"
    if not (d / "metrics.json").exists():
        raise RunError(f"{d}: no metrics.json (no finished case) to judge; run without --judge-only first")
    return d


def judge_run(run_dir: Path) -> int:
    """H-Acc / M-Acc of one run by each offline rule, and the strict self-refutation analysis, kept under
    results/{judge}/ (judge/ and analysis/ hold whichever ran last). The bundled MQuAKE-hard file gives
    the old answers that runs written before answers stored them (old_ref) lack."""
    from eval.__main__ import main as eval_main

    metrics = str(run_dir / "metrics.json")
    data = str(ROOT / "eval" / "data" / "MQuAKE-hard.json")
    for judge in JUDGES:
        out = run_dir / "results" / judge
        out.mkdir(parents=True, exist_ok=True)
        flags = ["--rule-based"] if judge == "strict" else ["--substring"]
        rc = eval_main(["judge", "--input", metrics, "--summary", str(out / "judge_summary.json"),
                        "--data_path", data, *flags])
        if rc != 0:
            return rc
    rc = eval_main(["analyze", "--input", metrics, "--rule-based"])
    if rc == 0:
        shutil.copyfile(run_dir / "analysis" / "pred_analysis.json", run_dir / "results" / "strict" / "pred_analysis.json")
    return rc


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def from_cache(record: dict) -> bool:
    """Whether a case's bootstrap took every candidate from the candidate cache (sampled nothing)."""
    b = (record.get("edit_stats") or {}).get("bootstrap") or {}
    return bool(b.get("selected")) and b.get("from_cache") == b.get("selected")


def stage_table(records: list[dict]) -> tuple[dict[str, float], float, int]:
    """Mean seconds per case of each stage, the largest peak GPU memory (GiB) of any stage, and how many
    cases took their bootstrap from the cache (left out of the bootstrap mean: ~0 s, nothing sampled)."""
    names: list[str] = []
    for r in records:
        names += [s for s in r.get("stages", {}) if s not in names]
    cached = sum(map(from_cache, records))
    means = {}
    for s in names:
        xs = [r["stages"][s]["seconds"] for r in records if s in r.get("stages", {})
              and not (s == "bootstrap" and from_cache(r))]
        if xs:
            means[s] = sum(xs) / len(xs)
    peak = max((v["peak_gpu_mem_bytes"] for r in records for v in r.get("stages", {}).values()), default=0)
    return means, peak / 2**30, cached


def answer_words(records: list[dict]) -> tuple[float | None, float | None]:
    """Median length in words of the judged answers (hop-wise and multi-hop) and the fraction of at most 5
    words: a bare answer either is the entity or is not; a reasoning chain must commit to one."""
    from eval.judge import judge_items

    n = [len(it.pred.split()) for it in judge_items(records)]
    return (statistics.median(n), sum(w <= 5 for w in n) / len(n)) if n else (None, None)


def edit_devices(runs: dict[str, tuple[Path, list[str]]]) -> str:
    """Where each run edited, from its meta/run_info.json: one name, or the methods grouped by device."""
    from eval.files import read_json

    names = {m: i.get("device_name") or f"{i.get('device', '?')} (name not recorded)" for m, (d, _) in runs.items()
             for i in [read_json(d / "meta" / "run_info.json", f"{m} run_info.json")]}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    groups: dict[str, list[str]] = {}
    for m, n in names.items():
        groups.setdefault(n, []).append(m)
    return "; ".join(f"{', '.join(ms)} on {n}" for n, ms in groups.items())


def judge_agreement() -> list:
    """Each judge against the hand labels (eval.agreement): the strict grader, the substring rule and the
    local LLM judge whose verdicts the validation set recorded; then the grader's self-refutation reading."""
    from eval.agreement import SRR_LABELS, agreement_table, judge_verdicts, load_labels, srr_agreement

    rows = load_labels()
    srr = srr_agreement(load_labels(SRR_LABELS, ("asserts_new", "self_refutes")))
    return rows, agreement_table(rows, judge_verdicts(rows)) + srr


def reader_check(path: Path = READER_CHECK) -> str | None:
    """The strict grader against one blind reader on a random sample of the edit preset's answers."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    same = sum(r["reader_label"] == r["grader_correct"] for r in rows)
    same_old = sum(r["reader_label_old"] == r["grader_asserts_old"] for r in rows)
    only_grader = sum(r["grader_correct"] and not r["reader_label"] for r in rows)
    only_reader = sum(r["reader_label"] and not r["grader_correct"] for r in rows)
    return (f"The edit preset answers in a new style (\"The answer is X.\", \"The answer to this question lies with "
            f"X\"), so its answers were checked too: on {len(rows)} drawn at random (hop-wise and multi-hop), one "
            f"reader blind to the grader, labelling from docs/grading.md, agrees with the strict grader on {same} "
            f"({_pct(same / len(rows))}%) for correct and {same_old} for asserts-old. Where they differ the grader "
            f"credits {only_grader} answer(s) the reader does not and misses {only_reader} the reader credits, so "
            f"that row's H-Acc more likely understates than overstates (`{os.path.relpath(path, ROOT)}`).")


def report(runs: dict[str, tuple[Path, list[str]]], *, model_type: str, small: bool, argv: list[str] | None) -> str:
    from eval.files import read_json

    labels, table = judge_agreement()
    strict = {a.split: a for a in table if a.judge == "strict"}
    refutes = next(a for a in table if a.judge == "strict self_refutes")
    lines = [f"# Results: {model_type} on MQuAKE-hard (cases with causal articles)", "",
             f"Date {dt.date.today().isoformat()}; edits ran on {edit_devices(runs)}; graded on this machine's CPU; "
             f"command `python scripts/results.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
             "H-Acc: hop-wise accuracy; M-Acc: a case passes when any of its 3 multi-hop questions does; SRR: "
             "self-refutation rate among rewrites whose hop answers assert the new fact (the paper's SRR). All in %.",
             "",
             f"Graded by the strict offline grader (`eval/grade.py`, docs/grading.md): an answer is correct when it "
             f"asserts the gold answer as its answer. It agrees with {len(labels)} hand-labelled answers of the "
             f"paper-preset runs {_pct(strict['all'].agree)}% of the time (precision {_pct(strict['all'].precision)}%, recall "
             f"{_pct(strict['all'].recall)}%; {_pct(strict['held-out'].agree)}% on the {strict['held-out'].n} "
             "answers held out while its rules were written). Its self-refutation reading, which gives SRR, is "
             f"weaker: on {refutes.n} answers labelled for self-refutation it flags {refutes.tp + refutes.fp}, of "
             f"which {refutes.tp} are self-refutations (precision {_pct(refutes.precision)}%, recall "
             f"{_pct(refutes.recall)}%), so the SRR column likely overstates self-refutation.", "",
             "| method | cases | H-Acc | M-Acc | SRR | asserted rewrites | answers asserting the old fact % | "
             "median words | ≤ 5 words % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reference = ["", "The reference's metric, for comparison with published tables: a gold alias anywhere in the "
                 "answer, case-insensitive (`python -m eval judge --substring`). It credits 'NA' inside \"manager\" "
                 "and a chain that names the entity without asserting it; its agreement with the hand labels is in "
                 "the next table.", "", "| method | H-Acc substring | M-Acc substring |", "|---|---:|---:|"]
    timing = ["", "Seconds per case by stage (mean; an MQuAKE-hard case edits its 4 facts together) and peak "
              "GPU memory:", "",
              "| method | " + " | ".join(STAGES) + " | peak GiB |", "|---|" + "---:|" * (len(STAGES) + 1)]
    unfinished: list[str] = []
    cached_note: list[str] = []
    assembled: list[str] = []
    for method, (run_dir, argv_run) in runs.items():
        parts = read_json(run_dir / "meta" / "run_info.json", f"{method} run_info.json").get("assembled_from")
        if parts:
            assembled.append(f"{method}: its cases ran as the E2 study's chosen arm (the same config, key for key) "
                             f"in {len(parts)} range folders, joined by `python bench/e2_study.py assemble` "
                             f"({', '.join(f'`{x}`' for x in parts)}). Those ranges ran 5-7 at a time on one GPU, so this row's "
                             "seconds per stage overstate a run that has the GPU to itself")
        j = {k: read_json(run_dir / "results" / k / "judge_summary.json", f"{method} {k} judge summary")
             for k in JUDGES}
        an = read_json(run_dir / "results" / "strict" / "pred_analysis.json", f"{method} strict analysis")
        records = read_json(run_dir / "metrics.json", f"{method} metrics.json")
        planned = sum(len(u["case_ids"]) for u in read_json(run_dir / "requests.json", f"{method} requests.json"))
        of = f" of {planned}" if len(records) < planned else ""
        if of:
            unfinished.append(f"{method} ({len(records)}{of} cases)")
        st, srr = j["strict"], an["summary"]["SRR"]
        asserted = an["summary"]["asserted_rewrites"]
        words = answer_words(records)
        median = "n/a" if words[0] is None else f"{words[0]:g}"
        old = st["items"]["asserts_old"] / st["items"]["total"] if st["items"]["total"] else None
        lines.append(f"| {method} | {len(records)}{of} | {_pct(st['overall_hop_wise_average'])} | "
                     f"{_pct(st['accuracy_averages']['any_right_accuracy'])} | {_pct(srr['rate'])} | "
                     f"{asserted['yes']} of {asserted['total']} | {_pct(old)} | {median} | {_pct(words[1])} |")
        sub = j["substring"]
        reference.append(f"| {method} | {_pct(sub['overall_hop_wise_average'])} | "
                         f"{_pct(sub['accuracy_averages']['any_right_accuracy'])} |")
        means, peak, n_cached = stage_table(records)
        if n_cached:
            cached_note.append(f"{method} {n_cached} of {len(records)}")
        timing.append(f"| {method} | " + " | ".join(f"{means[s]:.1f}" if s in means else "-" for s in STAGES)
                      + f" | {peak:.1f} |")
    if unfinished:
        lines += ["", "**Not finished when this was written:** " + ", ".join(unfinished) + ". Their rows and "
                  "timings cover the finished cases only; rerun the command when the runs are done."]
    lines += ["", "Run folders: " + ", ".join(f"`{d}`" for d, _ in runs.values()) + "."]
    lines += ["", *(a + "." for a in assembled)] if assembled else []
    check = None if small else reader_check()
    lines += ["", check] if check else []
    agree = ["", f"Each judge against the hand labels ({len(labels)} answers of the five paper-preset runs, "
             f"{sum(r['label'] for r in labels)} labelled correct; `python -m eval judge-agreement`). A judge is "
             "reported here only with these numbers; the local LLM judge (the 135M model itself, served by "
             "`python -m eval serve` with guided choice) is kept out of the headline because of them.", "",
             "| judge | answers | agreement % | precision % | recall % |", "|---|---:|---:|---:|---:|"]
    split_note = {"all": "", "held-out": " (held out)", "srr-set": " (self-refutation labels)"}
    agree += [f"| {a.judge}{split_note[a.split]} | {a.n} | {_pct(a.agree)} | {_pct(a.precision)} | "
              f"{_pct(a.recall)} |" for a in table]
    if cached_note:
        timing += ["", "The bootstrap mean leaves out the cases whose candidates all came from the bootstrap cache "
                   "(written by an earlier run on the same cases; ~0 s): " + ", ".join(cached_note) + "."]
    if not small:
        timing += ["", "A fresh process also compiles (torch.compile) during its first case, and these means include "
                   "that; BENCHMARKS.md \"SmolLM2\" has the steady-state seconds and the first-case cost."]
    lines += reference + agree + timing
    lines += ["", "Each method's run, as `python scripts/results.py` starts it (it resumes, so a repeat or a "
              "`--runs-only` call on another machine runs the same):", ""]
    lines += [f"- {m}: `python -m code_edit {' '.join(argv_run)}`" for m, (_, argv_run) in runs.items()]
    if small:
        lines += ["", "Smoke run (--small): a random tiny model; the numbers mean nothing."]
    else:
        lines += ["", *SCALE_NOTE]
    return "\n".join(lines) + "\n"


# What a 135M model run can and cannot tell.
SCALE_NOTE = [
    "## What a 135M model can and cannot show",
    "",
    "Can: that every stage runs end to end on real weights, what each stage costs in time and memory, and how "
    "the methods compare on this one model: InContext (the article in the prompt, the teacher's ceiling) against "
    "PreEdited (no edit), and the trained editors between or below them.",
    "",
    "Cannot: the paper's accuracy levels, which come from 7-8B models. A 135M model is a weak reasoner: its "
    "open-book thoughts (the SFT targets) are only as good as it writes them, and multi-hop questions need it to "
    "chain facts it may not hold. With 20 cases one case moves M-Acc by 5 points. SRR counts only rewrites whose "
    "hop answers asserted the new fact (the asserted-rewrites column), which are few here.",
    "",
    "Answer form: LoRA and CaKE fine-tune on the bare answer to each edit's own question, so they answer in a "
    "word or two, and on the edited hop that word is usually the new answer. CausalEdit at the paper preset, "
    "InContext and PreEdited answer in paragraphs (the answer-length columns), which at 135M often drift before, "
    "or without, committing to an answer; the strict grader credits a paragraph only when it asserts the gold "
    "answer as its answer. CausalEdit at the edit preset learns its teacher's closing line and answers in a "
    "sentence (\"The answer is Lisbon.\"), though the student is never told to.",
    "",
    "The edit preset (docs/e2_study.md): the paper recipe with the SFT learning rate at 1e-3 instead of 3e-5 and "
    "the open-book teacher told to end with \"The answer now is X.\" It was chosen on the first 10 of these 20 "
    "cases (the development split; `bench/runs/e2_dev_10cases.md`) before cases 11-20 were read "
    "(`bench/runs/e2_test_10cases.md`); the table above is all 20. The closed-book student agrees with the "
    "open-book teacher (same strict class: new, old or other answer) on 47.5% of the edited hops' probes "
    "(`bench/runs/e2_all_20cases.md`), against a target of 80%; the same greedy teacher run on the CPU and on the H200 agrees with itself on only "
    "70% (docs/e2_study.md).",
]


if __name__ == "__main__":
    sys.exit(main())

"""Issue E2's study: which changes make CausalEdit edit SmolLM2-135M. Arms are hparams files under
bench/study/e2/ (each extends smollm2-135m-instruct); every arm edits the same MQuAKE-hard article cases.
    GPU:  python bench/e2_study.py run --arms sft-lr,answer-line --cases 10   (arms run in parallel)
          python bench/e2_study.py run --arms sft-lr_answer-line --skip 10 --cases 10   (cases 11-20)
          python bench/e2_study.py run --arms sft-lr:0:10,sft-lr:10:5,sft-lr:15:5   (one process per range)
          python bench/e2_study.py teacher --cases 10     the open-book teacher's answers to the same probes
    CPU:  python bench/e2_study.py report --cases 10      strict H-Acc, M-Acc, SRR and teacher agreement
          python bench/e2_study.py assemble                 the chosen arm's 20 cases as the preset's run
          python bench/e2_study.py report --skip 10 --cases 10   the same on cases 11-20
State lives in .gpu_state/ (bench/gpu_job.sh packs it): runs under .gpu_state/study/, the bootstrap
cache shared with RESULTS.md's runs, so arms that change only SFT or distillation sample nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ROOT / "bench" / "study" / "e2"
STATE = ROOT / ".gpu_state"
STUDY = STATE / "study"
RESULTS = STATE / "results" / "MQuAKE-hard" / "smollm2-135m-instruct"
FORMS = ("system_sheet", "in_context")


def arm_argv(arm: str, cases: int, skip: int = 0) -> list[str]:
    """The arm's run of article cases skip+1 .. skip+cases. The case list is cut to --max_cases before
    --skip_cases drops its head, so max_cases is skip + cases. Each case's seeds come from its own id, so
    cases 11-20 run as `--skip 10 --cases 10` (their own folder) give the records of one 20-case run, and
    the report joins the folders."""
    return ["--editing_method", "CausalEdit", "--datatype", "MQuAKE-hard", "--hparams_path",
            str(ARMS / f"{arm}.toml"), "--max_cases", str(skip + cases), "--skip_cases", str(skip),
            "--articles_only", "--output_root", str(STUDY), "--run_id", "study" if skip == 0 else f"study-skip{skip}",
            "--cache_dir", str(STATE / "cache")]


def parse_runs(arms: str, cases: int, skip: int) -> list[tuple[str, int, int]]:
    """`ARM` or `ARM:SKIP:CASES`, comma-separated, into (arm, skip, cases); a bare ARM takes --skip/--cases.
    One arm may appear with several ranges: each range is its own process."""
    out = []
    for spec in arms.split(","):
        parts = spec.split(":")
        if len(parts) not in (1, 3) or not all(x.isdigit() for x in parts[1:]):
            raise ValueError(f"--arms entry {spec!r}: expected ARM or ARM:SKIP:CASES")
        out.append((parts[0], int(parts[1]), int(parts[2])) if len(parts) == 3 else (parts[0], skip, cases))
    return out


def run_arms(runs: list[tuple[str, int, int]], stagger: float) -> int:
    """Start every (arm, skip, cases) run as its own process (the first alone for `stagger` seconds, so that
    the others find its torch.compile cache), then wait for all; logs in /tmp/e2_<arm>_<skip>.log."""
    missing = sorted({arm for arm, _, _ in runs if not (ARMS / f"{arm}.toml").exists()})
    if missing:  # before any process starts
        print(f"error: no arm {', '.join(missing)} under {ARMS}", file=sys.stderr)
        return 2
    procs = {}
    for i, (arm, skip, cases) in enumerate(runs):
        name = f"{arm}_{skip}"
        log = open(f"/tmp/e2_{name}.log", "a")
        procs[name] = subprocess.Popen([sys.executable, "-m", "code_edit", *arm_argv(arm, cases, skip)], cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT)
        print(f"started {name} (pid {procs[name].pid})", flush=True)
        if i == 0 and len(runs) > 1:
            time.sleep(stagger)
    rc = 0
    for name, p in procs.items():
        code = p.wait()
        print(f"{name}: exit {code}", flush=True)
        rc = rc or code
    return rc


def dev_cases(cases: int) -> list[dict]:
    """The first `cases` article cases in run order (the order of RESULTS.md's 20-case runs)."""
    from code_edit.data import load_dataset
    units = json.loads((run_folder(RESULTS / "CausalEdit") / "requests.json").read_text())
    order = [u["case_ids"][0] for u in units]
    if cases > len(order):
        raise ValueError(f"asked for {cases} cases; MQuAKE-hard has {len(order)} cases with articles")
    order = order[:cases]
    by_id = {c["case_id"]: c for c in load_dataset("MQuAKE-hard")}
    return [by_id[i] for i in order]


def run_folder(method_dir: Path) -> Path:
    found = sorted(method_dir.glob("tag-*/n*_seed70_*"))
    if not found:
        raise FileNotFoundError(f"no run under {method_dir}")
    return found[0]


def teacher_file(form: str, articles: str, answer_line: bool) -> Path:
    return STUDY / f"teacher_{form}_{articles}{'_answer-line' if answer_line else ''}.jsonl"


def teacher_probes(case: dict, form: str, articles: str, answer_line: bool = False) -> list[dict]:
    """The open-book teacher's conversation for every hop-wise probe of an edited hop: the arm's teacher
    prompt (code_edit.prompts.teacher_messages) around the probe's question."""
    from code_edit.internalize import _teacher_articles
    from code_edit.data import edit_requests
    from code_edit.prompts import teacher_messages
    from eval.mquake import edited_rewrite
    from eval.probes import HOP, build_probes

    reqs = edit_requests(case)
    texts = _teacher_articles(reqs, articles)
    out = []
    for p in build_probes(case):
        if p.source != HOP:
            continue
        hop = case["new_single_hops"][p.hop]
        r = edited_rewrite({hop["answer"], *hop.get("answer_alias", [])}, case["requested_rewrite"])
        if r is None:
            continue
        q = reqs[r]
        msgs = teacher_messages(q.question, p.prompt, old_answer=q.old_answer, new_answer=q.new_answer,
                                article=texts[r], form=form, answer_line=answer_line)
        out.append({"case_id": case["case_id"], "hop": p.hop, "prompt": p.prompt, "refs": list(p.ref),
                    "old_refs": list(p.old_ref or []), "form": form, "articles": articles,
                    "answer_line": answer_line, "messages": msgs})
    return out


def parse_combos(text: str) -> list[tuple[str, str, bool]]:
    """`form:articles[:answer-line]`, comma-separated, into (form, articles, answer_line)."""
    out = []
    for spec in text.split(","):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[0] not in FORMS or parts[1] not in ("own", "case") or \
                (len(parts) == 3 and parts[2] != "answer-line"):
            raise ValueError(f"--combos entry {spec!r}: expected FORM:ARTICLES[:answer-line] with FORM in "
                             f"{'/'.join(FORMS)} and ARTICLES own/case")
        out.append((parts[0], parts[1], len(parts) == 3))
    return out


def teacher_answers(cases: int, combos: list[tuple[str, str, bool]]) -> None:
    """Greedy answers of the base model under each teacher prompt, with the evaluation's decoding."""
    from code_edit.config import load_hparams
    from eval.files import atomic_write_jsonl
    from eval.probes import GenConfig, model_chat_fn
    from model import load_model, load_tokenizer

    cfg = load_hparams("smollm2-135m-instruct")
    model = load_model(cfg.model.source, dtype=None)
    tok = load_tokenizer(cfg.model.source)
    gen = GenConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                    repetition_penalty=cfg.eval.repetition_penalty, seed=0)
    chat = model_chat_fn(model, tok, gen)
    for form, articles, answer_line in combos:
        rows = [r for c in dev_cases(cases) for r in teacher_probes(c, form, articles, answer_line)]
        t0 = time.perf_counter()
        preds = chat([r["messages"] for r in rows])
        out = teacher_file(form, articles, answer_line)
        atomic_write_jsonl(out, [{**{k: v for k, v in r.items() if k != "messages"}, "pred": p}
                                 for r, p in zip(rows, preds)])
        print(f"teacher {out.stem}: {len(rows)} answers in {time.perf_counter() - t0:.1f} s -> {out}")


# ---------------------------------------------------------------------------- the chosen preset's run folder

def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assemble(arm: str, preset: str) -> Path:
    """The chosen arm's 20 cases, from its range folders, as the preset's own run folder beside RESULTS.md's
    runs (`python -m code_edit --model_type PRESET ... --run_id results`), so scripts/results.py reports it
    like any run. Every source folder's hparams (code_edit.config.upgrade_hparams: in today's form) must equal
    the preset's but for the name, the final resume (code_edit.run.execute, which edits
    nothing when every case is done) checks the folder's identity and cases, and meta/run_info.json names the
    folders the records came from."""
    from code_edit.__main__ import build_parser
    from code_edit.config import upgrade_hparams
    from code_edit.run import _requests_json, execute, new_run_info, planned_dir, prepare, run_args_of
    from code_edit.run_folder import Journal, RunError
    from eval.files import append_jsonl, atomic_write_json, read_json

    # 1) the preset's run, as scripts/results.py starts it
    args = build_parser().parse_args(["--editing_method", "CausalEdit", "--datatype", "MQuAKE-hard", "--model_type",
                                      preset, "--max_cases", "20", "--output_root", str(STATE / "results"),
                                      "--run_id", "results", "--articles_only", "--cache_dir", str(STATE / "cache")])
    p = prepare(args)
    parent, prefix = planned_dir(args, p)
    out = parent / f"{prefix}results"
    if (out / "metrics.jsonl").exists():
        raise RunError(f"{out} already holds a journal; remove it to assemble again")
    # 2) every case's record from the arm's folders (the first folder that holds a case gives it)
    folders = sorted((STUDY / "MQuAKE-hard" / arm / "CausalEdit").glob("tag-*/n*_seed70_*"))
    rows: dict = {}
    for f in folders:
        for key, rec in Journal(f).rows().items():
            rows.setdefault(key, (rec, f))
    missing = [u.key for u in p.units if (u.key, u.cases[0]["case_id"]) not in rows]
    if missing:
        raise RunError(f"arm {arm}: no record of {', '.join(missing)} under {STUDY / 'MQuAKE-hard' / arm}")
    used = sorted({str(rows[(u.key, u.cases[0]['case_id'])][1].relative_to(ROOT)) for u in p.units})
    info = new_run_info(args, p)
    want = flat_keys(info["hparams"])
    for f in used:
        have = flat_keys(upgrade_hparams(read_json(ROOT / f / "meta" / "run_info.json", "run_info.json")["hparams"]))
        diff = sorted(k for k in set(want) | set(have) if k != "name" and want.get(k) != have.get(k))
        if diff:
            raise RunError(f"{f}: its hparams differ from preset {preset} on {', '.join(diff)}")
    # 3) meta files as code_edit.run.open_run writes them (where and when the first range ran), then the
    #    journal in run order
    first = read_json(folders[0] / "meta" / "run_info.json", "run_info.json")
    info.update({k: first.get(k) for k in ("eval_generation", "started_at", "git_commit", "python", "device",
                                            "model_dtype", "device_name")}, assembled_from=used)
    atomic_write_json(out / "meta" / "run_args.json", run_args_of(args, p))
    atomic_write_json(out / "requests.json", _requests_json(p.units))
    atomic_write_json(out / "meta" / "run_info.json", info)
    append_jsonl(out / "metrics.jsonl", [{"unit": u.key, "case_id": u.cases[0]["case_id"],
                                          "record": rows[(u.key, u.cases[0]["case_id"])][0]} for u in p.units])
    # 4) the resume: identity checked, outputs rebuilt, status finished
    return execute(args)


# ---------------------------------------------------------------------------- the report (CPU)

BASELINES = ("PreEdited", "InContext", "LoRA", "CaKE")
LEAK_WORDS = ("article", "passage", "document", "the text", "the report")


def dev_records(method_dir: Path, ids: list[int]) -> list[dict]:
    """The records of cases `ids` from every seed-70 run folder under `method_dir`, in the order of `ids`.
    A case held by two folders is an error: which record a report uses must never depend on folder names."""
    by_id: dict[int, tuple[dict, Path]] = {}
    for folder in sorted(method_dir.glob("tag-*/n*_seed70_*")):
        path = folder / "metrics.json"
        for r in json.loads(path.read_text()) if path.exists() else []:
            if r["case_id"] in by_id:
                raise ValueError(f"case {r['case_id']} is in both {by_id[r['case_id']][1]} and {folder}; "
                                 "remove one of them")
            by_id[r["case_id"]] = (r, folder)
    return [by_id[i][0] for i in ids if i in by_id]


def strict_numbers(records: list[dict], cases: list[dict]) -> dict:
    """Strict H-Acc and M-Acc (eval.judge.offline_summary, old answers from the cases), SRR (eval.analyze's
    flags read by the strict grader), and what the answers look like."""
    from eval.analyze import rewrite_flags, self_refute_items, srr_summary, strict_self_refute
    from eval.mquake import stored_old_refs
    from eval.judge import judge_items, offline_summary

    items = judge_items(records, stored_old_refs(records, cases))
    judged = offline_summary(records, cases=cases)
    sr_items, _ = self_refute_items(records)
    flags = rewrite_flags(sr_items, {it.key: {"result": "OK", **strict_self_refute(it)} for it in sr_items})
    srr = srr_summary(flags)
    preds = [it.pred for it in items]
    return {"h_acc": judged["overall_hop_wise_average"], "m_acc": judged["accuracy_averages"]["any_right_accuracy"],
            "srr": srr["SRR"], "asserted": srr["asserted_rewrites"], "cases": len(records),
            "answer_line": sum("the answer now is" in p.lower() for p in preds) / max(1, len(preds)),
            "leak": sum(any(w in p.lower() for w in LEAK_WORDS) for p in preds) / max(1, len(preds)),
            "median_words": sorted(len(p.split()) for p in preds)[len(preds) // 2] if preds else None}


def verdict_class(prompt: str, pred: str, refs: list[str], old_refs: list[str]) -> str:
    from eval.grade import grade
    g = grade(prompt, pred, refs, old_refs)
    return "new" if g.correct else "old" if g.asserts_old else "other"


def teacher_agreement(records: list[dict], form: str, articles: str, answer_line: bool) -> dict | None:
    """On the hop-wise probes of edited hops: how often the closed-book student's committed answer (new /
    old / other, by the strict grader) is the open-book teacher's, and how often the student states the new
    answer where the teacher does."""
    path = teacher_file(form, articles, answer_line)
    if not path.exists():
        return None
    teacher = {(r["case_id"], r["prompt"]): r for r in map(json.loads, path.read_text().splitlines())}
    same = n = t_new = both_new = 0
    for rec in records:
        for hop in rec["post"]["hop_wise_pred"]:
            for d in hop:
                t = teacher.get((rec["case_id"], d["prompt"]))
                if t is None:
                    continue
                tc = verdict_class(t["prompt"], t["pred"], t["refs"], t["old_refs"])
                sc = verdict_class(d["prompt"], d["pred"], d["ref"], t["old_refs"])
                n += 1
                same += tc == sc
                t_new += tc == "new"
                both_new += tc == "new" and sc == "new"
    return {"probes": n, "agree": same / n if n else None, "teacher_new": t_new / n if n else None,
            "student_new_where_teacher_new": both_new / t_new if t_new else None}


def stage_means(records: list[dict]) -> dict[str, float]:
    out = {}
    for s in ("bootstrap", "sft", "internalize", "eval"):
        xs = [r["stages"][s]["seconds"] for r in records if s in r.get("stages", {})]
        if xs:
            out[s] = sum(xs) / len(xs)
    return out


def report(cases: int, arms: list[str] | None, skip: int = 0) -> str:
    from code_edit.config import load_hparams

    dev = dev_cases(skip + cases)[skip:]
    ids = [c["case_id"] for c in dev]
    rows: list[tuple[str, Path, dict | None]] = [(m, RESULTS / m, None) for m in BASELINES]
    rows.append(("CausalEdit (paper)", RESULTS / "CausalEdit", load_hparams("smollm2-135m-instruct")))
    names = arms or sorted(p.name for p in (STUDY / "MQuAKE-hard").glob("*") if p.is_dir())
    for arm in names:
        rows += [(arm, STUDY / "MQuAKE-hard" / arm / "CausalEdit", load_hparams(ARMS / f"{arm}.toml"))]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"
    split = f"the first {cases}" if skip == 0 else f"cases {skip + 1}-{skip + cases} of the"
    lines = [f"# E2 study: {split} MQuAKE-hard article cases ({', '.join(map(str, ids))})",
             "", "Strict grader (docs/grading.md). Teacher agreement: on the hop-wise probes of edited hops, the share "
             "where the closed-book student's committed answer (new / old / other) equals the open-book teacher's "
             "(the base model under the arm's teacher prompt, `bench/e2_study.py teacher`), and the share of the "
             "teacher's new-answer probes where the student also states the new answer.", "",
             "| arm | cases | H-Acc | M-Acc | SRR | asserted | agree % (probes) | student new where teacher new % | "
             "'The answer now is' % | cites a text % | median words | sft s | internalize s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, folder, cfg in rows:
        recs = dev_records(folder, ids)
        if not recs:
            lines.append(f"| {name} | 0 | | | | | | | | | | | |")
            continue
        s = strict_numbers(recs, dev)
        it = cfg.internalize if cfg else None
        agr = teacher_agreement(recs, it.teacher_form, it.teacher_articles, it.teacher_answer_line) if it else None
        st = stage_means(recs)
        probes = f" ({agr['probes']})" if agr else ""
        lines.append(f"| {name} | {s['cases']} | {pct(s['h_acc'])} | {pct(s['m_acc'])} | {pct(s['srr']['rate'])} | "
                     f"{s['asserted']['yes']}/{s['asserted']['total']} | {pct(agr and agr['agree'])}{probes} | "
                     f"{pct(agr and agr['student_new_where_teacher_new'])} | {pct(s['answer_line'])} | "
                     f"{pct(s['leak'])} | {s['median_words']} | {st.get('sft', 0):.0f} | {st.get('internalize', 0):.0f} |")
    teachers = []
    for path in sorted(STUDY.glob("teacher_*.jsonl")):
        t = [r for r in map(json.loads, path.read_text().splitlines()) if r["case_id"] in set(ids)]
        new = sum(verdict_class(r["prompt"], r["pred"], r["refs"], r["old_refs"]) == "new" for r in t)
        teachers.append(f"- {path.stem}: states the new answer on {new} of {len(t)} probes "
                        f"({pct(new / len(t) if t else None)}%)")
    if teachers:
        lines += ["", "The open-book teachers on the same probes:", *teachers]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arms", required=True, help="comma-separated ARM or ARM:SKIP:CASES (bench/study/e2/<ARM>.toml)")
    r.add_argument("--cases", type=int, default=10)
    r.add_argument("--skip", type=int, default=0, help="start after this many article cases (cases 11-20: --skip 10)")
    r.add_argument("--stagger", type=float, default=90.0)
    t = sub.add_parser("teacher")
    t.add_argument("--cases", type=int, default=20)
    t.add_argument("--combos", default="system_sheet:own,in_context:own,in_context:case,system_sheet:own:answer-line,"
                   "system_sheet:case:answer-line", help="form:articles[:answer-line], comma-separated")
    asm = sub.add_parser("assemble", help="the chosen arm's 20 cases as the preset's run under .gpu_state/results")
    asm.add_argument("--arm", default="sft-lr_answer-line")
    asm.add_argument("--preset", default="smollm2-135m-instruct_edit")
    rep = sub.add_parser("report")
    rep.add_argument("--cases", type=int, default=10)
    rep.add_argument("--skip", type=int, default=0, help="report cases skip+1 .. skip+cases (the test split: --skip 10)")
    rep.add_argument("--arms", default=None, help="default: every arm with a run folder")
    rep.add_argument("--out", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if a.cmd == "run":
        try:
            runs = parse_runs(a.arms, a.cases, a.skip)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_arms(runs, a.stagger)
    if a.cmd == "teacher":
        try:
            combos = parse_combos(a.combos)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        teacher_answers(a.cases, combos)
        return 0
    if a.cmd == "assemble":
        print(assemble(a.arm, a.preset))
        return 0
    text = report(a.cases, a.arms.split(",") if a.arms else None, a.skip)
    print(text)
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: edit the embedded SmolLM2-135M-Instruct on MQuAKE-hard cases that have causal articles,
before (PreEdited) and after (CausalEdit), through the normal `python -m code_edit` runs, then the offline
strict-grader analysis and one before/after table. `--smoke`: the same on the tiny random model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from eval.files import read_json
from eval.mquake import target_str
from eval.grade import grade
from eval.judge import offline_summary
from eval.probes import normalize_answer

DATATYPE = "MQuAKE-hard"
METHODS = ("PreEdited", "CausalEdit")  # before, after
GPU_PRESET = "smollm2-135m-instruct_edit"  # the embedded model's editing preset (docs/e2_study.md)
RUN_ID = "demo"  # fixed: rerunning `make demo` after it finished only reprints the table
SNIPPET = 38  # characters of each answer shown in the table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m code_edit.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="hparams preset (default: smollm2-135m-instruct_edit on a GPU, "
                                                   "demo, its cut-down, on a CPU)")
    ap.add_argument("--smoke", action="store_true", help="CI smoke run: the tiny random model (preset tiny) on CPU")
    ap.add_argument("--cases", type=int, default=2, help="MQuAKE-hard cases with articles to edit (1-20, default 2)")
    ap.add_argument("--output_root", default="./output/demo")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    ap.add_argument("--fresh", action="store_true", help="delete this preset's earlier demo runs and bootstrap "
                                                         "cache first (otherwise a finished demo is reused)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.device = "tiny", a.device or "cpu"
    if a.preset is None:
        a.preset = GPU_PRESET if on_gpu(a.device) else "demo"
    if not 1 <= a.cases <= 20:
        ap.error("--cases must be between 1 and 20 (MQuAKE-hard has 20 cases with articles)")
    return a


def on_gpu(device: str | None) -> bool:
    """Where the runs will go: --device if given, else CUDA when there is one (python -m code_edit's rule)."""
    from model.load import default_device
    return (device or str(default_device())).startswith("cuda")


def run_argv(method: str, a: argparse.Namespace, root: Path) -> list[str]:
    # --articles_only: PreEdited (which needs no article) evaluates the same cases as CausalEdit.
    argv = ["--editing_method", method, "--datatype", DATATYPE, "--articles_only",
            "--model_type", a.preset, "--max_cases", str(a.cases), "--output_root", str(root / "experiments"),
            "--cache_dir", str(root / "bootstrap_cache" / a.preset), "--run_id", RUN_ID]
    return argv + (["--device", a.device] if a.device else [])


def forget_earlier(root: Path, preset: str) -> None:
    """--fresh: remove only what this driver created for `preset` (its run folders and bootstrap cache)."""
    for d in (root / "experiments" / DATATYPE / preset).glob(f"*/tag-*/n*_seed*_{RUN_ID}"):
        shutil.rmtree(d)
    shutil.rmtree(root / "bootstrap_cache" / preset, ignore_errors=True)


def finished_before(root: Path, preset: str, method: str, n_cases: int) -> bool:
    """Whether this demo run already finished earlier (then execute() only rebuilds its outputs)."""
    pattern = f"tag-*/n{n_cases}_seed*_{RUN_ID}/meta/run_info.json"
    for info in (root / "experiments" / DATATYPE / preset / method).glob(pattern):
        if read_json(info, "run_info.json").get("status") == "finished":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from code_edit.__main__ import build_parser
    from code_edit.run import execute
    from code_edit.run_folder import RunError
    from eval.analyze import run_analyze
    from eval.judge import make_backend

    root = Path(a.output_root)
    if a.fresh:
        forget_earlier(root, a.preset)
    t_start = time.perf_counter()
    runs: dict[str, dict] = {}
    for method in METHODS:
        print(f"\n=== {method} ({'before' if method == 'PreEdited' else 'after'} the edit), preset {a.preset} ===",
              flush=True)
        reused = finished_before(root, a.preset, method, a.cases)
        t0 = time.perf_counter()
        try:
            run_dir = execute(build_parser().parse_args(run_argv(method, a, root)))
        except RunError as e:
            print(f"error: {e}\n(rerun with --fresh to start the demo over)", file=sys.stderr)
            return 2
        wall = time.perf_counter() - t0
        # Offline, never an endpoint: the strict grader even when an API key is in the environment.
        analysis = run_analyze(run_dir / "metrics.json", make_backend(base_url=None, judge_model=None, rule_based=True),
                               progress=False)
        info = read_json(run_dir / "meta" / "run_info.json", "run_info.json")
        runs[method] = {"dir": run_dir, "wall": wall, "info": info, "analysis": analysis,
                        "records": read_json(run_dir / "metrics.json", "metrics.json"),
                        "reused": reused}
    total = time.perf_counter() - t_start
    lines = demo_table(runs, a.preset, total)
    table_file = root / f"demo_table_{a.preset}.txt"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = table_file.with_name(table_file.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(table_file)
    print("\n" + "\n".join(lines) + f"\n  this table:   {table_file}")
    return 0


# ------------------------------------------------------------------------------------------------
# The table

def snippet(pred: str, refs: list[str], width: int = SNIPPET) -> str:
    """One line of the answer: around the first gold alias it contains, else its beginning."""
    text = " ".join(pred.split())
    low = text.lower()
    hits = [low.find(r.lower()) for r in refs if r.strip() and r.lower() in low]
    start = max(0, min(hits) - width // 3) if hits else 0
    out = text[start:start + width]
    if start > 0:
        out = "…" + out[1:]
    if start + width < len(text):
        out = out[:-1] + "…"
    return out or "(empty)"


def edited_hops(record: dict) -> list[tuple[int, int]]:
    """(hop index, rewrite index) for each hop whose gold answer is some rewrite's new answer."""
    news = [normalize_answer(rw["target_new"]) for rw in record["requested_rewrite"]]
    out = []
    for h, items in enumerate(record["post"]["hop_wise_pred"]):
        refs = {normalize_answer(r) for r in items[0]["ref"]} if items else set()
        k = next((i for i, n in enumerate(news) if n in refs), None)
        if k is not None:
            out.append((h, k))
    return out


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


Q, G = 34, 16  # widths of the question and gold-answer columns


def demo_table(runs: dict[str, dict], preset: str, total_s: float) -> list[str]:
    """The before/after table: per case its edited-hop and multi-hop answers and self-refutation flags,
    then accuracy, seconds per stage and where the files are. `runs[method]` = dir, wall, reused, info,
    analysis (eval.analyze result) and records (metrics.json)."""
    pre, post = runs["PreEdited"], runs["CausalEdit"]
    info = post["info"]
    gen = info.get("eval_generation", {})
    lines = [f"=== make demo: {info.get('model_source')} (preset {preset}, {info.get('device')}, "
             f"{info.get('model_dtype', info.get('dtype'))}) on {len(post['records'])} {DATATYPE} case(s) "
             "with causal articles ===",
             f"Answers: greedy, at most {gen.get('max_new_tokens')} new tokens (reduced for the demo; the paper "
             f"preset allows 768, so long reasoning is cut off), repetition penalty {gen.get('repetition_penalty')}.",
             "correct? = the strict grader (docs/grading.md): the answer asserts the gold answer as its answer; "
             "snippets show the answer around the gold alias when it occurs, else its start."]
    before = {r["case_id"]: r for r in pre["records"]}
    for rec in post["records"]:
        if rec["case_id"] not in before:
            raise ValueError(f"case_id {rec['case_id']}: in the CausalEdit run but not in the PreEdited run "
                             f"({pre['dir']})")
        lines += case_lines(before[rec["case_id"]], rec, pre["analysis"]["rewrites"], post["analysis"]["rewrites"])
    lines += ["", "Summary (strict grader; SRR among rewrites whose hop answers assert the new answer):"]
    for method, run in runs.items():
        res = offline_summary(run["records"])
        srr = run["analysis"]["summary"]["SRR"]
        lines.append(f"  {method:<11} H-Acc {_pct(res['overall_hop_wise_average']):>6}   "
                     f"M-Acc {_pct(res['accuracy_averages']['any_right_accuracy']):>6}   SRR {srr['yes']}/{srr['total']}")
    lines += time_lines(runs, total_s)
    lines += ["", "Outputs:"]
    for method, run in runs.items():
        lines.append(f"  {method:<11} {run['dir']}/  (metrics.json, res.json, run.log, analysis/pred_analysis.txt)")
    return lines


def case_lines(b: dict, a: dict, flags_b: dict, flags_a: dict) -> list[str]:
    """One case: its edits, a row per edited hop (question form) and per multi-hop question, then the
    strict grader's self-refutation flags per rewrite. `b`/`a`: the case's PreEdited / CausalEdit record."""
    cid, rws = a["case_id"], a["requested_rewrite"]
    lines = ["", f"Case {cid}: {len(rws)} edit(s), {len(a['post']['hop_wise_pred'])} hops"]
    lines += [f"  edit rw{k}: {_cut(rw['question'], 60)}  {target_str(rw['target_true'])} -> {rw['target_new']}"
              for k, rw in enumerate(rws)]
    lines.append(f"  {'':<13}{'question':<{Q}} {'gold new answer':<{G}} {'before (PreEdited)':<{SNIPPET}} "
                 f"{'after (CausalEdit)':<{SNIPPET}} correct? b→a")
    hb = [[_correct(d) for d in hop] for hop in b["post"]["hop_wise_pred"]]
    ha = [[_correct(d) for d in hop] for hop in a["post"]["hop_wise_pred"]]
    for h, k in edited_hops(a):
        j = 1 if len(ha[h]) > 1 else 0  # the question form "Now, {question} Let's think step by step."
        forms = f"  (all {len(ha[h])} forms: {sum(hb[h])}/{len(hb[h])} → {sum(ha[h])}/{len(ha[h])})"
        lines.append(answer_row(f"hop {h + 1} (rw{k})", b["post"]["hop_wise_pred"][h][j],
                                a["post"]["hop_wise_pred"][h][j], hb[h][j], ha[h][j]) + forms)
    for i, item in enumerate(a["post"]["accuracy_pred"]):
        before = b["post"]["accuracy_pred"][i]
        lines.append(answer_row(f"multi-hop {i + 1}", before, item, _correct(before), _correct(item)))
    lines.append("  self-refutation (strict grader, eval.analyze; b→a): asserts new answer in a hop answer"
                 " | self-refutes in any probe")
    for k, rw in enumerate(rws):
        x, y = flags_b.get(f"{cid}|rw{k}"), flags_a.get(f"{cid}|rw{k}")
        if x is None or y is None:
            lines.append(f"    rw{k} {rw['target_new']}: not judged (no analysable answer)")
            continue
        lines.append(f"    rw{k} {_cut(rw['target_new'], G):<{G}} asserts {_yn(x['retrieved_target_new_in_hop'])}"
                     f" → {_yn(y['retrieved_target_new_in_hop'])} | self-refutes {_yn(x['combined'])} → "
                     f"{_yn(y['combined'])}")
    return lines


def _correct(item: dict) -> bool:
    return grade(item["prompt"], item["pred"], item["ref"], item.get("old_ref") or []).correct


def answer_row(label: str, before: dict, after: dict, ok_b: bool, ok_a: bool) -> str:
    return (f"  {label:<13}{_cut(after['q'] or '', Q):<{Q}} {_cut(after['ref'][-1], G):<{G}} "
            f"{snippet(before['pred'], before['ref']):<{SNIPPET}} {snippet(after['pred'], after['ref']):<{SNIPPET}} "
            f"{_yn(ok_b)} → {_yn(ok_a)}")


def time_lines(runs: dict[str, dict], total_s: float) -> list[str]:
    stages = ("bootstrap", "sft", "internalize", "eval")
    lines = ["", "Seconds per stage (from metrics.json `stages`):",
             f"  {'method':<11} {'case':>6} " + " ".join(f"{n:>11}" for n in stages) + f" {'total':>8}"]
    for method, run in runs.items():
        for r in run["records"]:
            st = r.get("stages", {})
            cells = [f"{st[n]['seconds']:>11.1f}" if n in st else f"{'-':>11}" for n in stages]
            lines.append(f"  {method:<11} {r['case_id']:>6} " + " ".join(cells)
                         + f" {sum(v['seconds'] for v in st.values()):>8.1f}")
    walls = "; ".join(f"{m} " + ("reused (finished earlier; --fresh redoes it)" if r["reused"]
                                 else f"{r['wall']:.0f} s") for m, r in runs.items())
    lines.append(f"  wall time incl. model load: {walls}; whole demo {total_s:.0f} s")
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())

"""Draw the hand-labelling samples that validate the strict grader (docs/grading.md), from the five committed
20-case SmolLM2 runs (bench/runs/gpu_state.tgz, unpacked to .gpu_state/). Written unlabelled; a rerun keeps
the labels of unchanged answers and refuses to drop labelled ones.
    python scripts/label_sample.py answers   # tests/data/judge_validation.jsonl: correctness labels
    python scripts/label_sample.py srr       # tests/data/srr_validation.jsonl: self-refutation labels

`answers`: seed 17, stratified by method, by hop-wise vs multi-hop and by short (<= 20 words) vs long, with
the local LLM judge's recorded verdicts; a tenth held out. `srr`: seed 18, every self-refutation item
(edited-hop and conflict-probe answers) the grader flags and three times as many among the items that name
the new answer but are not flagged. Its flags depend on the grader, so a later grader draws another sample:
the committed one was drawn with the grader of the commit that added it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval.agreement import write_sample  # noqa: E402
from eval.analyze import self_refute_items, strict_self_refute  # noqa: E402
from eval.files import read_jsonl  # noqa: E402
from eval.mquake import alias_table, old_refs_for  # noqa: E402
from eval.judge import item_key  # noqa: E402
from eval.mquake import load_mquake  # noqa: E402
from eval.probes import answer_matches  # noqa: E402

RUNS = ROOT / ".gpu_state/results/MQuAKE-hard/smollm2-135m-instruct"
METHODS = ["PreEdited", "InContext", "LoRA", "CaKE", "CausalEdit"]
KINDS = {"hop_wise_pred": "hop", "accuracy_pred": "multi"}
SHORT_WORDS = 20
PER_STRATUM = 12          # 5 methods x 2 kinds x 2 lengths x 12 = 240 answers, fewer after deduplication
HELDOUT_SHARE = 0.1
LLM_JUDGE = "llm:smollm2-135m-instruct:guided"  # the local judge of the old RESULTS.md, whose verdicts the runs keep


def run_dir(method: str) -> Path:
    return next((RUNS / method).glob("tag-*/n20_seed70_results"))


def pool(method: str, dataset: dict[int, dict], aliases: dict[str, list[str]]) -> list[dict]:
    """Every judged answer of one run, deduplicated on (answer, refs): a bare answer repeated on the
    cloze and question forms of a hop is one item."""
    run = run_dir(method)
    llm = {row["key"]: row["result"] for row in read_jsonl(run / "judge/metrics.judged.ckpt.jsonl")
           if row["judge_id"] == LLM_JUDGE}
    items, seen = [], set()
    for rec in json.loads((run / "metrics.json").read_text()):
        case = dataset[rec["case_id"]]
        for source, kind in KINDS.items():
            value = rec["post"][source]
            slots = ([(f"{source}[{h}][{s}]", d, h) for h, hop in enumerate(value) for s, d in enumerate(hop)]
                     if kind == "hop" else [(f"{source}[{k}]", d, None) for k, d in enumerate(value)])
            for path, d, hop in slots:
                key = (" ".join(d["pred"].split()).lower(), tuple(d["ref"]))
                if key in seen:
                    continue
                seen.add(key)
                items.append({"method": method, "kind": kind, "case_id": rec["case_id"], "path": path,
                              "length": "short" if len(d["pred"].split()) <= SHORT_WORDS else "long",
                              "question": d["prompt"], "answer": d["pred"], "refs": list(d["ref"]),
                              "old_refs": old_refs_for(case, hop, aliases),
                              "verdicts": {LLM_JUDGE: llm[item_key(rec["case_id"], path, d["prompt"], d["pred"])]}})
    return items


def draw(rng: random.Random, items: list[dict]) -> list[dict]:
    """PER_STRATUM of each length for one (method, kind); a short stratum is filled from the other length."""
    short = [x for x in items if x["length"] == "short"]
    long_ = [x for x in items if x["length"] == "long"]
    rng.shuffle(short)
    rng.shuffle(long_)
    n_short = min(len(short), max(PER_STRATUM, 2 * PER_STRATUM - len(long_)))
    n_long = min(len(long_), 2 * PER_STRATUM - n_short)
    return short[:n_short] + long_[:n_long]


def answers_sample(out: Path) -> str:
    dataset = {c["case_id"]: c for c in load_mquake(ROOT / "eval/data/MQuAKE-hard.json")}
    aliases = alias_table(dataset.values())
    rng = random.Random(17)
    sample = []
    for method in METHODS:
        items = pool(method, dataset, aliases)
        for kind in KINDS.values():
            sample += draw(rng, [x for x in items if x["kind"] == kind])
    heldout = set(rng.sample(range(len(sample)), round(HELDOUT_SHARE * len(sample))))
    rows = [{"id": f"v{i:03d}", **x, "heldout": i in heldout} for i, x in enumerate(sample)]
    write_sample(out, rows, {"label": None, "label_old": None, "note": "", "reread": False})
    return f"{len(rows)} answers ({len(heldout)} held out)"


def srr_sample(out: Path) -> str:
    rng = random.Random(18)
    flagged, others = [], []
    for method in METHODS:
        run = run_dir(method)
        items, _ = self_refute_items(json.loads((run / "metrics.json").read_text()))
        for it in items:
            row = {"method": method, "case_id": it.case_id, "path": it.path, "source": it.source,
                   "question": it.prompt, "answer": it.pred, "refs": it.ref, "old_refs": it.old_ref}
            if strict_self_refute(it)["self_refutation_detected"]:
                flagged.append(row)
            elif answer_matches(it.pred, it.ref) and len(it.pred.split()) > 5:
                others.append(row)
    sample = flagged + rng.sample(others, min(len(others), 3 * len(flagged)))
    rng.shuffle(sample)
    rows = [{"id": f"s{i:03d}", **x} for i, x in enumerate(sample)]
    write_sample(out, rows, {"asserts_new": None, "self_refutes": None, "note": "", "readers_agree": None})
    return f"{len(rows)} answers ({len(flagged)} flagged)"


SAMPLES = {"answers": (answers_sample, "judge_validation.jsonl"), "srr": (srr_sample, "srr_validation.jsonl")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sample", choices=sorted(SAMPLES))
    ap.add_argument("--out", default=None, help="default tests/data/<the sample's file>")
    a = ap.parse_args(argv)
    if not RUNS.exists():
        print(f"error: {RUNS} is missing: unpack the committed runs first (tar xzf bench/runs/gpu_state.tgz)",
              file=sys.stderr)
        return 2
    fn, name = SAMPLES[a.sample]
    out = Path(a.out or ROOT / "tests" / "data" / name)
    try:
        print(f"{fn(out)} -> {out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

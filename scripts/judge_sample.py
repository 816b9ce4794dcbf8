"""Draw the hand-labelling sample that validates the strict grader (docs/grading.md "Validation set").

From the five committed 20-case SmolLM2 runs (bench/runs/gpu_state.tgz, unpacked to .gpu_state/), draw
answers with a fixed seed, stratified by method, by hop-wise vs multi-hop and by short (<= 20 words) vs
long, and write them unlabelled with the local LLM judge's recorded verdicts; labels are added by reading each answer (docs/grading.md "Labelling guide").
    python scripts/judge_sample.py --out tests/data/judge_validation.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval.grade import alias_table, old_refs_for  # noqa: E402
from eval.files import read_jsonl  # noqa: E402
from eval.judge import item_key  # noqa: E402
from eval.mquake import load_mquake  # noqa: E402

RUNS = ROOT / ".gpu_state/results/MQuAKE-hard/smollm2-135m-instruct"
METHODS = ["PreEdited", "InContext", "LoRA", "CaKE", "CausalEdit"]
KINDS = {"hop_wise_pred": "hop", "accuracy_pred": "multi"}
SHORT_WORDS = 20
PER_STRATUM = 12          # 5 methods x 2 kinds x 2 lengths x 12 = 240 answers
HELDOUT_SHARE = 0.1
SEED = 17
LLM_JUDGE = "llm:smollm2-135m-instruct:guided"  # the local judge of RESULTS.md, whose verdicts the runs keep


def pool(method: str, dataset: dict[int, dict], aliases: dict[str, list[str]]) -> list[dict]:
    """Every judged answer of one run, deduplicated on (answer, refs): a bare answer repeated on the
    cloze and question forms of a hop is one item."""
    run = next((RUNS / method).glob("tag-*/n20_seed70_results"))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests/data/judge_validation.jsonl"))
    a = ap.parse_args(argv)
    if not RUNS.exists():
        print(f"error: {RUNS} is missing: unpack the committed runs first (tar xzf bench/runs/gpu_state.tgz)",
              file=sys.stderr)
        return 2
    dataset = {c["case_id"]: c for c in load_mquake(ROOT / "eval/data/MQuAKE-hard.json")}
    aliases = alias_table(dataset.values())
    rng = random.Random(SEED)
    sample = []
    for method in METHODS:
        items = pool(method, dataset, aliases)
        for kind in KINDS.values():
            sample += draw(rng, [x for x in items if x["kind"] == kind])
    heldout = set(rng.sample(range(len(sample)), round(HELDOUT_SHARE * len(sample))))
    out = Path(a.out)
    # Labels already made for the same answer are kept: a rerun never loses hand work.
    done = {(r["id"], r["answer"]): r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    blank = {"label": None, "label_old": None, "note": "", "reread": False}
    rows = []
    for i, x in enumerate(sample):
        row = {"id": f"v{i:03d}", **x, "heldout": i in heldout}
        old = done.get((row["id"], row["answer"]), blank)
        rows.append({**row, **{k: old.get(k, v) for k, v in blank.items()}})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    print(f"{len(rows)} answers ({len(heldout)} held out) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

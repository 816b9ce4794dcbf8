"""`make demo`'s driver (code_edit.demo) in its --smoke form: the tiny random model on the same two
MQuAKE-hard cases through the real CLI runs and the strict-grader analysis; the printed table is checked
row by row against the stored records, and a rerun reuses the finished runs. Plus the demo preset,
the "auto" model dtype and the Makefile target."""
import argparse
import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from code_edit import demo
from code_edit.config import load_hparams
from eval.grade import grade

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = demo.main(["--smoke", "--output_root", str(root)])
    assert rc == 0
    return root, buf.getvalue()


def run_dir(root: Path, method: str) -> Path:
    tag = "T0_S1" if method == "CausalEdit" else "default"
    d = root / "experiments" / "MQuAKE-hard" / "tiny" / method / f"tag-{tag}" / "n2_seed70_demo"
    assert d.is_dir(), d
    return d


def records(root: Path, method: str) -> list[dict]:
    return json.loads((run_dir(root, method) / "metrics.json").read_text())


def table_of(out: str) -> list[str]:
    start = out.index("=== make demo:")
    return out[start:].splitlines()


def rows_between(lines: list[str], first: str, stop: str) -> list[str]:
    i = next(k for k, line in enumerate(lines) if line.startswith(first))
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith(stop) or not lines[k].strip())
    return lines[i:j]


def test_outputs_hold_both_methods_on_the_same_article_cases(smoke):
    root, _ = smoke
    from code_edit.data import case_has_articles, load_dataset
    cases = [c for c in load_dataset("MQuAKE-hard") if case_has_articles(c)]
    assert len(cases) == 20
    pre, post = records(root, "PreEdited"), records(root, "CausalEdit")
    assert [r["method"] for r in pre] == ["PreEdited"] * 2 and [r["method"] for r in post] == ["CausalEdit"] * 2
    assert [r["case_id"] for r in pre] == [r["case_id"] for r in post]
    assert {r["case_id"] for r in post} <= {c["case_id"] for c in cases}
    assert all(list(r["stages"]) == ["eval"] for r in pre)
    assert all(list(r["stages"]) == ["bootstrap", "sft", "internalize", "eval"] for r in post)
    assert all(r["edit_stats"]["internalize"]["steps"] >= 1 and r["edit_stats"]["bootstrap"]["candidates"] > 0
               for r in post)
    for method in ("PreEdited", "CausalEdit"):
        d = run_dir(root, method)
        assert json.loads((d / "meta" / "run_info.json").read_text())["status"] == "finished"
        an = json.loads((d / "analysis" / "pred_analysis.json").read_text())
        assert an["judge"] == "strict"
        assert (d / "analysis" / "pred_analysis.txt").is_file() and (d / "res.json").is_file()


def _edited(case_record: dict) -> list[tuple[int, int]]:
    """Independent of the driver: a hop is edited when its gold answer or an alias equals a new answer."""
    out = []
    for h, items in enumerate(case_record["post"]["hop_wise_pred"]):
        refs = {r.strip().lower() for r in items[0]["ref"]}
        ks = [k for k, rw in enumerate(case_record["requested_rewrite"]) if rw["target_new"].strip().lower() in refs]
        if ks:
            out.append((h, ks[0]))
    return out


def _collapsed(text: str) -> str:
    return " ".join(text.split())


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _strict(item: dict) -> bool:
    """The table's correct? column is the strict grader's verdict (eval.grade, tested in test_grade.py)."""
    return grade(item["prompt"], item["pred"], item["ref"], item.get("old_ref") or []).correct


def test_table_rows_match_the_records(smoke):
    root, out = smoke
    lines = table_of(out)
    pre = {r["case_id"]: r for r in records(root, "PreEdited")}
    post = records(root, "CausalEdit")
    for col in ("question", "gold new answer", "before (PreEdited)", "after (CausalEdit)", "correct? b→a"):
        assert sum(col in line for line in lines) == len(post), col  # one header per case
    assert "at most 16 new tokens" in lines[1]  # the tiny preset's eval length, stated in the header
    for rec in post:
        cid, b = rec["case_id"], pre[rec["case_id"]]
        block = rows_between(lines, f"Case {cid}:", "Case ")
        hop_rows = [line for line in block if re.match(r"\s+hop \d+ \(rw\d+\)", line)]
        edited = _edited(rec)
        assert len(hop_rows) == len(edited) > 0
        for row, (h, k) in zip(hop_rows, edited):
            assert row.strip().startswith(f"hop {h + 1} (rw{k})")
            after, before = rec["post"]["hop_wise_pred"][h][1], b["post"]["hop_wise_pred"][h][1]
            assert after["q"][:20] in row and after["ref"][-1][:12] in row
            for item in (before, after):  # no alias in a tiny model's answer: the snippet is its start
                text = _collapsed(item["pred"])
                if not any(r.lower() in text.lower() for r in item["ref"]):
                    assert (text[:12] or "(empty)") in row
            sb = [_strict(d) for d in b["post"]["hop_wise_pred"][h]]
            sa = [_strict(d) for d in rec["post"]["hop_wise_pred"][h]]
            ok = f"{_yn(sb[1])} → {_yn(sa[1])}"
            counts = f"{sum(sb)}/3 → {sum(sa)}/3"
            assert ok in row and counts in row
        multi = [line for line in block if re.match(r"\s+multi-hop \d", line)]
        assert len(multi) == len(rec["post"]["accuracy_pred"]) == 3
        for i, row in enumerate(multi):
            assert rec["post"]["accuracy_pred"][i]["q"][:20] in row
            verdicts = (_strict(b["post"]["accuracy_pred"][i]), _strict(rec["post"]["accuracy_pred"][i]))
            assert row.rstrip().endswith(f"{_yn(verdicts[0])} → {_yn(verdicts[1])}")
        assert any("self-refutation (strict grader" in line for line in block)
        flags_b = json.loads((run_dir(root, "PreEdited") / "analysis" / "pred_analysis.json").read_text())["rewrites"]
        flags_a = json.loads((run_dir(root, "CausalEdit") / "analysis" / "pred_analysis.json").read_text())["rewrites"]
        sr_rows = [line for line in block if re.match(r"\s+rw\d+ ", line)]
        assert len(sr_rows) == len(rec["requested_rewrite"])
        for k, row in enumerate(sr_rows):
            x, y = flags_b[f"{cid}|rw{k}"], flags_a[f"{cid}|rw{k}"]
            assert f"asserts {_yn(x['retrieved_target_new_in_hop'])} → {_yn(y['retrieved_target_new_in_hop'])}" in row
            assert f"self-refutes {_yn(x['combined'])} → {_yn(y['combined'])}" in row


def test_table_times_and_paths(smoke):
    root, out = smoke
    lines = table_of(out)
    i = lines.index("Seconds per stage (from metrics.json `stages`):")
    assert lines[i + 1].split() == ["method", "case", "bootstrap", "sft", "internalize", "eval", "total"]
    for method in ("PreEdited", "CausalEdit"):
        for rec in records(root, method):
            (row,) = [line for line in lines[i + 2:i + 6] if line.split()[:2] == [method, str(rec["case_id"])]]
            cells = row.split()[2:]
            want = [f"{rec['stages'][n]['seconds']:.1f}" if n in rec["stages"] else "-"
                    for n in ("bootstrap", "sft", "internalize", "eval")]
            assert cells[:4] == want
            assert abs(float(cells[4]) - sum(v["seconds"] for v in rec["stages"].values())) < 0.11
    assert any(line.startswith("  wall time incl. model load:") for line in lines)
    for method in ("PreEdited", "CausalEdit"):
        assert any(str(run_dir(root, method)) in line for line in lines)
    saved = (root / "demo_table_tiny.txt").read_text().splitlines()
    assert saved == lines[:len(saved)] and len(lines) == len(saved) + 1  # + the "this table:" line


def test_rerun_reuses_finished_runs(smoke, capsys):
    root, _ = smoke
    journals = {m: (run_dir(root, m) / "metrics.jsonl").read_text() for m in ("PreEdited", "CausalEdit")}
    assert demo.main(["--smoke", "--output_root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "reused (finished earlier" in out
    assert {m: (run_dir(root, m) / "metrics.jsonl").read_text() for m in journals} == journals


def test_snippet_centres_on_the_gold_alias():
    pred = "Let us think.  The creator\nwas, after much debate, Russell T Davies, who wrote it in 1978 for the BBC."
    s = demo.snippet(pred, ["Terry", "Russell T Davies"], width=30)
    assert len(s) == 30 and "Russell T Davies" in s and s.startswith("…") and s.endswith("…")
    assert demo.snippet("short answer", ["x"], width=30) == "short answer"
    assert demo.snippet("", ["x"]) == "(empty)"


def test_demo_preset_is_the_smollm2_edit_preset_cut_down():
    d, full = load_hparams("demo"), load_hparams("smollm2-135m-instruct_edit")
    assert d.model.source == full.model.source == "smollm2-135m-instruct" and d.model.dtype == "auto"
    def method(c):
        return (c.editing_mode, c.student_use_sft, c.teacher_use_sft, c.lora.rank, c.lora.target_modules,
                c.internalize.direction, c.internalize.top_k_support, c.bootstrap.temperature,
                c.bootstrap.learning_rate, c.internalize.teacher_form, c.internalize.teacher_answer_line)

    assert method(d) == method(full)
    b, fb = d.bootstrap, full.bootstrap
    assert b.replica_times * b.num_samples < fb.replica_times * fb.num_samples
    assert 1 <= d.internalize.max_steps_base < full.internalize.max_steps_base
    assert d.eval.max_new_tokens < full.eval.max_new_tokens


def test_default_preset_follows_the_device():
    assert demo.parse_args(["--device", "cuda"]).preset == "smollm2-135m-instruct_edit"
    assert demo.parse_args(["--device", "cpu"]).preset == "demo"
    assert demo.parse_args(["--device", "cuda", "--preset", "demo"]).preset == "demo"
    assert demo.parse_args(["--smoke"]).preset == "tiny"


def test_auto_dtype_is_the_loaders_default(tmp_path):
    from code_edit.run import Prepared, load_editor

    base = load_hparams("tiny")
    args = argparse.Namespace(model_path=None, device="cpu", cache_dir=str(tmp_path), datatype="x",
                              save_adapters=False)
    for dtype, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=dtype))
        ed = load_editor(args, Prepared(cfg, "PreEdited", "tiny", "default", [], {}), tmp_path)
        assert ed.model.lm_head.weight.dtype == want and ed.device.type == "cpu"


def test_make_demo_runs_the_driver():
    # --no-print-directory: under `make test` this make is nested and would print "Entering directory"
    out = subprocess.run(["make", "--no-print-directory", "-n", "demo", "DEMO_ARGS=--smoke"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert re.search(r"-m code_edit\.demo --smoke$", out.stdout.strip(), re.MULTILINE)

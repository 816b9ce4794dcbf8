"""python -m code_edit end to end on the tiny model: every method writes every output file with the
documented keys in the docs/method.md 7.1 layout; interrupted runs (exception, kill -9 with a torn journal
line) resume with each case exactly once; settings mismatches are refused; batch mode; preflight."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import code_edit.run as R
import code_edit.run_folder as F
from code_edit.__main__ import main
from test_editor_fixtures import cli_args, write_hparams

REPO = Path(__file__).resolve().parent.parent
POST_KEYS = {"hop_wise", "hop_wise_pred", "accuracy", "accuracy_pred", "conflict_probe",
             "causal_enhanced_hop_wise_pred", "causal_enhanced_conflict_probe", "old_knowledge_probe"}
RECORD_KEYS = {"case_id", "requested_rewrite", "time", "post", "method", "unit", "stages", "edit_stats"}
STAGES = {"CausalEdit": ["bootstrap", "sft", "internalize", "eval"], "LoRA": ["sft", "eval"],
          "CaKE": ["sft", "eval"], "InContext": ["eval"], "PreEdited": ["eval"]}


def run_dirs(tmp_path, method, tag):
    return sorted((tmp_path / "out" / "handmade" / "test-tiny" / method / f"tag-{tag}").glob("n*_seed70_*"))


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method, tag", [("CausalEdit", "T0_S1"), ("LoRA", "default"), ("CaKE", "default"),
                                         ("InContext", "default"), ("PreEdited", "default")])
def test_every_method_writes_every_file(tmp_path, method, tag, capsys):
    alias = {"CausalEdit": "causaledit", "PreEdited": "pre-edited"}.get(method, method)
    assert main(cli_args(tmp_path, alias, "--run_id", "r1", "--save_adapters")) == 0
    (d,) = run_dirs(tmp_path, method, tag)
    assert d.name == "n1_seed70_r1"
    names = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert {"metrics.json", "res.json", "requests.json", "metrics.jsonl", "run.log", "meta/run_args.json",
            "meta/run_info.json"} <= names
    assert any(n.startswith("adapters/case-") for n in names) == (method in ("CausalEdit", "LoRA", "CaKE"))
    (rec,) = json.loads((d / "metrics.json").read_text())
    assert set(rec) == RECORD_KEYS and set(rec["post"]) == POST_KEYS
    assert isinstance(rec["requested_rewrite"][0]["target_new"], str) and isinstance(rec["time"], float)
    assert list(rec["stages"]) == STAGES[method]
    assert all(set(v) == {"seconds", "peak_gpu_mem_bytes"} for v in rec["stages"].values())
    assert len(rec["post"]["hop_wise_pred"]) == 2 and all(len(h) == 3 for h in rec["post"]["hop_wise_pred"])
    res = json.loads((d / "res.json").read_text())
    assert res["total_cases"] == 1 and isinstance(res["overall_hop_wise_average"], float)
    assert isinstance(res["accuracy_averages"]["qa"], float)
    (row,) = jsonl(d / "metrics.jsonl")
    assert row["unit"] == rec["unit"] and row["case_id"] == rec["case_id"] and row["record"] == rec
    (req,) = json.loads((d / "requests.json").read_text())
    assert req["unit"] == rec["unit"] and req["case_ids"] == [rec["case_id"]]
    assert req["requests"][0]["new_answer"] == rec["requested_rewrite"][0]["target_new"]
    args = json.loads((d / "meta" / "run_args.json").read_text())
    assert (args["editing_method"], args["exp_tag"], args["run_id"], args["model_type"]) == (method, tag, "r1",
                                                                                            "test-tiny")
    info = json.loads((d / "meta" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["units_done"] == info["units_total"] == 1
    assert info["hparams"]["eval"]["max_new_tokens"] == 6 and info["method"] == method
    assert (info["device"], info["device_name"]) == ("cpu", "cpu")  # the report names the machine from these
    out = capsys.readouterr().out
    assert f"{method}: 1 cases" in out and "eval" in out


def test_exception_then_resume_each_case_once(tmp_path, monkeypatch):
    calls = []
    real = R.Editor.run_unit

    def flaky(self, key, *a, **k):
        calls.append(key)
        if len(calls) == 3:
            raise RuntimeError("injected crash")
        return real(self, key, *a, **k)

    monkeypatch.setattr(R.Editor, "run_unit", flaky)
    args = cli_args(tmp_path, "PreEdited", max_cases=4)
    assert main(args) == 2  # one line on stderr, the traceback in run.log
    (d,) = run_dirs(tmp_path, "PreEdited", "default")
    assert [r["case_id"] for r in json.loads((d / "metrics.json").read_text())] == \
        [int(k.split("-")[1]) for k in calls[:2]]
    info = json.loads((d / "meta" / "run_info.json").read_text())
    assert info["status"] == "failed" and "injected crash" in info["error"]
    first = list(calls)
    calls.clear()
    assert main(args) == 0  # no --run_id: the unfinished run with the same settings is resumed
    assert run_dirs(tmp_path, "PreEdited", "default") == [d]
    assert len(calls) == 2 and calls[0] == first[2] and not set(calls) & set(first[:2])  # done cases not redone
    records = json.loads((d / "metrics.json").read_text())
    ids = [r["case_id"] for r in records]
    assert sorted(ids) == [1, 2, 3, 4] and ids == [int(k.split("-")[1]) for k in first[:2] + calls]
    assert sorted(r["case_id"] for r in jsonl(d / "metrics.jsonl")) == [1, 2, 3, 4]
    assert json.loads((d / "res.json").read_text())["total_cases"] == 4
    # a finished run is not resumed by a plain rerun: a new run starts (give --run_id to reopen one)
    calls.clear()
    assert main(args + ["--max_cases", "1"]) == 0 and len(calls) == 1


KILLER = """
import os, signal, sys
import code_edit.run_folder as F
real = F.Journal.append
n = [0]
def append(self, unit, records):
    real(self, unit, records)
    n[0] += 1
    if n[0] == 2:  # die in the middle of writing the next line
        with open(self.path, "a") as f:
            f.write('{"unit": "case-999", "case_id": 999, "rec')
        os.kill(os.getpid(), signal.SIGKILL)
F.Journal.append = append
from code_edit.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_with_torn_line_then_resume(tmp_path):
    args = cli_args(tmp_path, "PreEdited", "--run_id", "k", max_cases=3)
    env = {**os.environ, "CODE_EDIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (d,) = run_dirs(tmp_path, "PreEdited", "default")
    assert not (d / "metrics.jsonl").read_text().endswith("\n")  # the torn line is there
    # killed between journaling case 2 and rebuilding metrics.json: the journal is ahead, and wins
    assert len(json.loads((d / "metrics.json").read_text())) == 1
    assert main(args) == 0
    rows = jsonl(d / "metrics.jsonl")  # every line parses: the torn one was cut before appending
    assert len(rows) == 3 and len({r["case_id"] for r in rows}) == 3  # the 2 journaled cases were not redone
    assert len(json.loads((d / "metrics.json").read_text())) == 3
    assert json.loads((d / "meta" / "run_info.json").read_text())["status"] == "finished"


def test_run_id_with_other_settings_is_refused(tmp_path, capsys):
    args = cli_args(tmp_path, "PreEdited", "--run_id", "x")
    assert main(args) == 0
    write_hparams(tmp_path, 'extends = "tiny"\n[eval]\nmax_new_tokens = 5\n')
    assert main(args) == 2
    assert "hparams differ" in capsys.readouterr().err


def test_batch_edit_groups_evaluate_contributing_cases(tmp_path):
    from code_edit.data import order_cases
    from test_editor_fixtures import dataset

    order = [c["case_id"] for c in order_cases(dataset(), seed=70, batch_mode=True)]
    assert order == [4, 3, 2, 1]  # (code_edit.data's tests check the shuffle itself)
    assert main(cli_args(tmp_path, "LoRA", "--batch_edit", "2", "--run_id", "b")) == 0
    # By hand (docs/method.md 3.7): unique edits in case order: Hooli (4), Tyrell (3), Acme (3), Umbrella (2);
    # case 1's Acme is a duplicate key. Groups of 2: [Hooli, Tyrell] -> cases 4, 3; [Acme, Umbrella] -> 3, 2.
    (d,) = run_dirs(tmp_path, "LoRA", "default")
    assert d.name == "n3_b2_seed70_b"
    units = json.loads((d / "requests.json").read_text())
    assert [(u["unit"], [r["subject"] for r in u["requests"]], u["case_ids"]) for u in units] == \
        [("group-1", ["Hooli", "Tyrell"], [4, 3]), ("group-2", ["Acme", "Umbrella"], [3, 2])]
    records = json.loads((d / "metrics.json").read_text())
    assert [(r["group"], r["case_id"]) for r in records] == [(1, 4), (1, 3), (2, 3), (2, 2)]
    assert all(r["edit_stats"]["edits"] == 2 for r in records)
    assert len(jsonl(d / "metrics.jsonl")) == 4


def test_preflight_says_what_is_missing_on_cpu(tmp_path, monkeypatch, capsys):
    import code_edit.preflight as P

    monkeypatch.setenv("CODE_EDIT_CACHE", str(tmp_path))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "CODE_EDIT_API_KEYS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(P, "can_connect", lambda *a, **k: False)  # tests never touch the network
    monkeypatch.setattr(P, "hub_cached", lambda repo: False)
    monkeypatch.setattr(P, "hf_token_source", lambda: None)
    assert main(["preflight"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] GPU: no CUDA GPU visible" in out and "about 31 GiB free" in out
    assert "[FAIL] weights meta-llama/Llama-3.1-8B-Instruct: not in the Hugging Face cache" in out
    assert "MQuAKE-T_causalenhanced.json" in out and "--data_path" in out
    assert "strict offline grader will be used" in out and "NOT ready" in out

    # network up, no token: the gated model says what to do; a key is never printed
    monkeypatch.setattr(P, "can_connect", lambda *a, **k: True)
    monkeypatch.setenv("CODE_EDIT_API_KEYS", "sk-secret-123,sk-secret-456")
    assert main(["preflight", "--judge-base-url", "http://127.0.0.1:9/v1"]) == 1
    out = capsys.readouterr().out
    assert "gated model: accept its license" in out and "HF_TOKEN" in out
    assert "2 key(s)" in out and "sk-secret" not in out

    # everything in place: ready
    monkeypatch.setattr(P, "cuda_memory", lambda: ("NVIDIA H100", 78.0, 79.6))
    monkeypatch.setattr(P, "hf_token_source", lambda: "$HF_TOKEN")
    assert main(["preflight"]) == 0
    out = capsys.readouterr().out
    assert "[ OK ] GPU: NVIDIA H100: 78.0 of 79.6 GiB free" in out and "preflight: ready" in out
    monkeypatch.setattr(P, "cuda_memory", lambda: ("small GPU", 12.0, 16.0))
    assert main(["preflight", "--model_type", "qwen2.5-7b-instruct", "--datatype", "MQuAKE-hard"]) == 1
    assert "[FAIL] GPU: small GPU: 12.0 of 16.0 GiB free" in capsys.readouterr().out


def test_articles_only_selects_the_article_cases_for_any_method():
    """MQuAKE-hard: PreEdited with --articles_only plans exactly CausalEdit's cases, in the same order;
    without it, it plans from all 429. A run folder written before the flag existed resumes as without it."""
    from code_edit.__main__ import build_parser
    plan = lambda *extra: [u.key for u in R.prepare(build_parser().parse_args(  # noqa: E731
        ["--datatype", "MQuAKE-hard", "--model_type", "tiny", "--max_cases", "20", *extra])).units]
    causal = plan("--editing_method", "CausalEdit")
    assert len(causal) == 20
    assert plan("--editing_method", "PreEdited", "--articles_only") == causal
    assert plan("--editing_method", "PreEdited") != causal
    old = {k: v for k, v in F._identity({"articles_only": False}).items() if k != "articles_only"}
    assert F._identity(old) == F._identity({"articles_only": False})
    assert F._differences(F._identity(old), F._identity({"articles_only": True}))


@pytest.mark.parametrize("module", ["code_edit", "eval"])
def test_help_does_not_import_torch(module):
    """--help is parsed before the heavy imports (it answers in a fraction of a second, not seconds)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "requests" not in imported

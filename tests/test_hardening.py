"""Issue R1's failures, each as a test that failed before the fix: bad numbers, divergence, changed data on
resume, half-made run folders, bad arguments, Ctrl-C, tracebacks, temp files, file modes and strict JSON
(python -m code_edit on the tiny model; eval's pieces in test_eval_hardening.py)."""
import json
import os
import stat

import pytest

import code_edit.run as R
import code_edit.run_folder as F
from code_edit.__main__ import main
from test_editor_fixtures import HPARAMS, cli_args, dataset, write_dataset, write_hparams


def run_dir(tmp_path, method="PreEdited", tag="default"):
    (d,) = sorted((tmp_path / "out" / "handmade" / "test-tiny" / method / f"tag-{tag}").glob("n*_seed70_*"))
    return d


def info(d):
    return json.loads((d / "meta" / "run_info.json").read_text())


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0.0"])
def test_non_finite_or_zero_learning_rate_is_refused_before_loading(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setattr(R, "load_editor", lambda *a, **k: pytest.fail("the model was loaded"))
    args = cli_args(tmp_path, "LoRA")
    write_hparams(tmp_path, HPARAMS + f"[baseline_lora]\nlearning_rate = {value}\n")  # cli_args wrote the default
    assert main(args) == 2
    one_line_error(capsys, "baseline_lora.learning_rate")


def test_diverged_training_stops_the_case_and_never_finishes(tmp_path, capsys, monkeypatch):
    """A loss that turns NaN (here injected into the SFT loss) stops the case: the run is not finished, no
    record claims an answer; with --on_error skip the case is logged as failed and the run is incomplete."""
    import train.sft as S
    real = S.weighted_ce_at
    monkeypatch.setattr(S, "weighted_ce_at", lambda *a, **k: real(*a, **k) * float("nan"))
    args = cli_args(tmp_path, "LoRA", "--run_id", "d")
    assert main(args) == 2
    one_line_error(capsys, "case-", "TrainingDiverged", "lower the learning rate")
    d = run_dir(tmp_path, "LoRA")
    assert info(d)["status"] == "failed" and "TrainingDiverged" in info(d)["error"]
    assert json.loads((d / "metrics.json").read_text()) == []
    assert main(args + ["--on_error", "skip"]) == 0
    assert info(d)["status"] == "incomplete" and "TrainingDiverged" in (d / "failures.jsonl").read_text()
    assert "error" not in info(d) and info(d)["previous_stops"][0]["status"] == "failed"  # the stop is history
    monkeypatch.undo()  # the loss is finite again: the same command finishes the run
    assert main(args) == 0
    final = info(d)
    assert final["status"] == "finished" and not {"error", "failed_at"} & set(final)
    assert "TrainingDiverged" in final["previous_stops"][0]["error"]


def test_changed_data_is_not_resumed(tmp_path, capsys):
    args = cli_args(tmp_path, "PreEdited", "--run_id", "c")
    assert main(args) == 0
    first = info(run_dir(tmp_path))["dataset"]["content_sha256"]
    cases = dataset()
    for c in cases:  # same case ids, other content
        c["new_single_hops"][0]["question"] += " (today)"
    write_dataset(tmp_path, cases)
    assert main(args) == 2
    msg = one_line_error(capsys, "the selected cases changed", first[:12], "another --run_id")
    assert msg.count("sha256") == 1
    # without --run_id the finished run is left alone and a new one starts over the new data
    assert main([a for a in args if a not in ("--run_id", "c")]) == 0


def test_a_folder_killed_while_being_created_is_started_again(tmp_path):
    args = cli_args(tmp_path, "PreEdited", "--run_id", "h")
    d = tmp_path / "out" / "handmade" / "test-tiny" / "PreEdited" / "tag-default" / "n1_seed70_h"
    (d / "meta").mkdir(parents=True)
    (d / ".lock").write_text("")
    (d / "meta" / "run_args.json").write_text("{}")  # killed before run_info.json
    assert main(args) == 0
    assert info(d)["status"] == "finished"


@pytest.mark.parametrize("extra, needle", [
    (["--batch_edit", "-3"], "--batch_edit -3"),
    (["--batch_edit", "91"], "--batch_edit 91"),
    (["--skip_cases", "-1"], "--skip_cases -1"),
    (["--hop", "0"], "--hop 0"),
])
def test_bad_numbers_on_the_command_line(tmp_path, capsys, extra, needle):
    assert main(cli_args(tmp_path, "PreEdited", *extra)) == 2
    one_line_error(capsys, needle)


def test_bad_device_and_output_root(tmp_path, capsys):
    args = cli_args(tmp_path, "PreEdited")
    args[args.index("--device") + 1] = "tpu"
    assert main(args) == 2
    one_line_error(capsys, "--device tpu")
    (tmp_path / "afile").write_text("x")
    args = cli_args(tmp_path, "PreEdited")
    args[args.index("--output_root") + 1] = str(tmp_path / "afile" / "sub")
    assert main(args) == 2
    one_line_error(capsys, "is a file")
    import torch
    if not torch.cuda.is_available():
        args = cli_args(tmp_path, "PreEdited")
        args[args.index("--device") + 1] = "cuda"
        assert main(args) == 2
        one_line_error(capsys, "no CUDA GPU")


def test_ctrl_c_says_how_to_resume_and_records_it(tmp_path, capsys, monkeypatch):
    def interrupt(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(R.Editor, "run_unit", interrupt)
    assert main(cli_args(tmp_path, "PreEdited", "--run_id", "i")) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    d = run_dir(tmp_path)
    assert info(d)["status"] == "interrupted"
    assert "interrupted; rerun the same command to resume" in (d / "run.log").read_text()
    monkeypatch.undo()
    assert main(cli_args(tmp_path, "PreEdited", "--run_id", "i")) == 0 and info(d)["status"] == "finished"


def test_a_failing_case_prints_one_line_and_logs_the_traceback(tmp_path, capsys, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(R.Editor, "run_unit", boom)
    assert main(cli_args(tmp_path, "PreEdited")) == 2
    one_line_error(capsys, "failed: RuntimeError: injected", "run.log")
    log = (run_dir(tmp_path) / "run.log").read_text()
    assert "Traceback" in log and "fix the cause" in log


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(R.Editor, "run_unit", boom)
    with pytest.raises(F.UnitFailed):
        main(cli_args(tmp_path, "PreEdited", "--debug"))


def test_temp_files_swept_modes_and_strict_json(tmp_path):
    args = cli_args(tmp_path, "PreEdited", "--run_id", "t")
    assert main(args) == 0
    d = run_dir(tmp_path)
    stale = [d / ".metrics.json.abc123.tmp", d / "meta" / ".run_info.json.x.tmp"]
    for p in stale:
        p.write_text("half")
    assert main(args) == 0  # the finished run is reopened by its id, and swept
    assert not any(p.exists() for p in stale)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "res.json", "requests.json", "meta/run_info.json", "metrics.jsonl"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o666 & ~umask, name

    def no_constants(c):
        raise ValueError(f"non-strict JSON constant {c}")
    for name in ("metrics.json", "res.json", "meta/run_info.json"):
        json.loads((d / name).read_text(), parse_constant=no_constants)


def test_nan_values_are_written_as_null(tmp_path):
    from eval.files import append_jsonl, atomic_write_json, read_jsonl
    atomic_write_json(tmp_path / "a.json", {"loss": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"loss": None, "x": [None, 1.0]}
    append_jsonl(tmp_path / "b.jsonl", [{"loss": float("-inf")}])
    assert list(read_jsonl(tmp_path / "b.jsonl")) == [{"loss": None}]


def test_sft_and_distillation_raise_on_a_non_finite_step():
    import torch
    from model.load import tiny_random
    from model.lora import LoraConfig, add_lora, lora_parameters
    from train import TrainingDiverged
    from train.sft import SFTConfig, sft

    model = tiny_random(seed=0)
    add_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.0, targets=("q_proj",), seed=0))
    params = lora_parameters(model)
    with torch.no_grad():
        params[0].fill_(float("nan"))
    examples = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 2])]
    with pytest.raises(TrainingDiverged, match="SFT step 1"):
        sft(model, examples, params, SFTConfig(lr=1e-3, epochs=2, batch_size=2, stop_loss=None), log=None)

    # the distillation half: a NaN adapter stops the step before AdamW touches the weights
    from model.lora import lora_modules
    from train.distill import DistillConfig, DistillPrompt, Distiller
    model = tiny_random(seed=0)
    add_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.0, targets=("q_proj",), seed=0))
    params = lora_parameters(model)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.fill_(float("nan"))
    before = [p.detach().clone() for p in params]
    d = Distiller(model, params, DistillConfig(lr=1e-3, max_steps=2, warmup_steps=0, rollouts_per_prompt=2,
                                               micro_batches=1, max_completion_length=6), stop_ids=[2])
    with pytest.raises(TrainingDiverged, match="distillation step 1"):
        d.step([DistillPrompt([1, 5, 6], [1, 9, 5, 6], prompt_index=0)], seed=0)
    assert d.steps_done == 0
    assert all(torch.equal(a.isnan(), p.isnan()) and torch.equal(a.nan_to_num(), p.detach().nan_to_num())
               for a, p in zip(before, params))


def test_a_stray_key_error_is_named_as_a_missing_key(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise KeyError("peak_gpu_mem_bytes")
    monkeypatch.setattr(R, "execute", broken)
    assert main(cli_args(tmp_path, "PreEdited")) == 2
    one_line_error(capsys, "missing key 'peak_gpu_mem_bytes'", "--debug")

"""`make reproduce`: the reference README's two CODE runs, then the judge and the analysis. With more
than one visible GPU each run is sharded over all of them (torchrun, one process per GPU; --nproc).

Qwen2.5-7B-Instruct on MQuAKE-CF-3k-v2 and Llama-3.1-8B-Instruct on MQuAKE-T (CausalEdit, 400 cases,
hop 2, shuffle seed 70, tag 2-hop); preflight first; every step resumes (fixed run id "reproduce",
judge/analysis checkpoints). Prints one table at the end. `--small`: a CPU smoke run of the same
pipeline (tiny preset, one bundled MQuAKE-hard case, offline judge).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from code_edit.__main__ import build_parser  # noqa: E402

FULL = [("qwen2.5-7b-instruct", "MQuAKE-CF-3k-v2"), ("llama3.1-8b-instruct", "MQuAKE-T")]
SMALL = [("tiny", "MQuAKE-hard")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny preset, 1 MQuAKE-hard case")
    ap.add_argument("--output_root", default="./output/experiments")
    ap.add_argument("--max_cases", type=int, default=None, help="default 400 (1 with --small)")
    ap.add_argument("--judge-base-url", default=None, help="OpenAI-compatible judge endpoint (default: a key in "
                                                           "$CODE_EDIT_API_KEYS/$OPENAI_API_KEY uses the reference's)")
    ap.add_argument("--judge-model", default=None)
    ap.add_argument("--api-key-file", default=None)
    ap.add_argument("--skip-preflight", action="store_true")
    ap.add_argument("--nproc", type=int, default=None, help="processes per run, one per GPU (default: every visible "
                                                            "GPU; 1 with --small). N > 1 launches torchrun")
    a = ap.parse_args(argv)

    from code_edit.preflight import preflight, report
    from code_edit.run import execute
    from code_edit.run_folder import RunError
    from eval.__main__ import main as eval_main

    runs = SMALL if a.small else FULL
    if not a.skip_preflight:
        text, ok = report(preflight([m for m, _ in runs], [d for _, d in runs], judge_base_url=a.judge_base_url,
                                    api_key_file=a.api_key_file, need_gpu=not a.small))
        print(text)
        if not ok:
            return 1
    judge_flags = []
    for flag, val in (("--base-url", a.judge_base_url), ("--judge-model", a.judge_model),
                      ("--api-key-file", a.api_key_file)):
        if val:
            judge_flags += [flag, val]

    rows = []
    for model_type, datatype in runs:
        argv_run = ["--editing_method", "CausalEdit", "--datatype", datatype, "--model_type", model_type,
                    "--max_cases", str(a.max_cases or (1 if a.small else 400)), "--shuffle_seed", "70",
                    "--exp_tag", "2-hop", "--output_root", a.output_root, "--run_id", "reproduce"]
        if a.small:
            argv_run += ["--device", "cpu"]
        else:
            argv_run += ["--hop", "2"]
        nproc = a.nproc or (1 if a.small else max(visible_gpus(), 1))
        print(f"\n=== CausalEdit {model_type} on {datatype}{f' ({nproc} processes)' if nproc > 1 else ''} ===",
              flush=True)
        try:
            if nproc > 1:
                if subprocess.run(launch_command(nproc, argv_run), cwd=ROOT).returncode != 0:
                    print(f"error: the {nproc}-process run stopped (see its output above); rerun to resume",
                          file=sys.stderr)
                    return 2
                run_dir = run_dir_of(build_parser().parse_args(argv_run))
            else:
                run_dir = execute(build_parser().parse_args(argv_run))
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        metrics = str(run_dir / "metrics.json")
        if eval_main(["judge", "--input", metrics, *judge_flags]) != 0:
            return 2
        if eval_main(["analyze", "--input", metrics, "--llm-self-refute", "on", "--rewrite-why", "on",
                      *judge_flags]) != 0:
            return 2
        rows.append((model_type, datatype, run_dir))
    print("\n" + "\n".join(table(rows)))
    return 0


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def launch_command(nproc: int, argv_run: list[str]) -> list[str]:
    """torchrun on this host (--standalone: a free rendezvous port), one process per GPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "code_edit", *argv_run]


def run_dir_of(args: argparse.Namespace) -> Path:
    """The folder a --run_id run writes (what execute() returns in a one-process run)."""
    from code_edit.run import planned_dir, prepare

    parent, prefix = planned_dir(args, prepare(args))
    return parent / f"{prefix}{args.run_id}"


def table(rows: list[tuple[str, str, Path]]) -> list[str]:
    from eval.files import read_json

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    out = [f"{'model':<24} {'dataset':<16} {'cases':>5} {'H-Acc':>7} {'M-Acc':>7} {'SRR':>7} {'why-align':>9}  judge"]
    for model_type, datatype, run_dir in rows:
        j = read_json(run_dir / "judge" / "metrics.judged.summary.json", "judge summary")
        an = read_json(run_dir / "analysis" / "pred_analysis.json", "analysis")
        why = an.get("rewrite_why", {}).get("mean_rewrite_pass_rate")
        out.append(f"{model_type:<24} {datatype:<16} {j['total_cases']:>5} {pct(j['overall_hop_wise_average']):>7} "
                   f"{pct(j['accuracy_averages']['any_right_accuracy']):>7} {pct(an['summary']['SRR']['rate']):>7} "
                   f"{pct(why):>9}  {j.get('judge')}")
    out.append("H-Acc / M-Acc: judge summary (M-Acc = any of the 3 multi-hop questions passes); SRR: combined "
               "self-refutation among rewrites that asserted the new answer; why-align: rationale alignment.")
    return out


if __name__ == "__main__":
    sys.exit(main())

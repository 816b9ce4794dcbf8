"""Command line: `python -m code_edit --editing_method ... --datatype ... --model_type ...` runs (or
resumes) an editing experiment with the reference's flags (docs/method.md 7.1), in one process or sharded
over `torchrun --nproc_per_node N -m code_edit ...`;
`python -m code_edit preflight` checks what a run needs before it starts."""

from __future__ import annotations

import argparse
import os
import sys

REPRODUCE_PRESETS = ["qwen2.5-7b-instruct", "llama3.1-8b-instruct"]
REPRODUCE_DATASETS = ["MQuAKE-CF-3k-v2", "MQuAKE-T"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m code_edit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editing_method", required=True,
                    help="CausalEdit | LoRA | CaKE | InContext | PreEdited (aliases: causaledit, lora, cake, "
                         "in-context, pre-edited, ...)")
    ap.add_argument("--datatype", required=True, help="MQuAKE-CF-3k-v2 | MQuAKE-T | MQuAKE-hard (or any name with "
                                                      "--data_path)")
    ap.add_argument("--model_type", default=None, help="preset in code_edit/hparams/ (e.g. qwen2.5-7b-instruct_cake); "
                                                       "names the output folder")
    ap.add_argument("--hparams_path", default=None, help="any hparams TOML (overrides --model_type's preset)")
    ap.add_argument("--max_cases", type=int, default=200, help="cases to run (default 200; <= 0: all; ignored "
                                                                "with --batch_edit)")
    ap.add_argument("--hop", type=int, default=None, help="keep only cases with this many hops")
    ap.add_argument("--articles_only", action="store_true", help="keep only cases with a causal article for every "
                    "rewrite, whatever the method (CausalEdit and InContext always do): compare methods on one set")
    ap.add_argument("--shuffle_seed", type=int, default=70)
    ap.add_argument("--exp_tag", default="", help="output tag (default: T{teacher_use_sft}_S{student_use_sft} for "
                                                  "CausalEdit, 'default' otherwise)")
    ap.add_argument("--batch_edit", type=int, default=0, help="N > 0: edit groups of N unique edits jointly (<= 90)")
    ap.add_argument("--skip_cases", type=int, default=0, help="drop the first N ordered cases (not with --batch_edit)")
    ap.add_argument("--output_root", default="./output/experiments")
    ap.add_argument("--run_id", default="", help="run folder suffix; an existing one is resumed. Default: resume "
                                                 "the newest unfinished run with the same settings, else a timestamp")
    ap.add_argument("--data_path", default=None, help="a local MQuAKE-format file instead of the named dataset")
    ap.add_argument("--model_path", default=None, help="model source overriding the preset's (dir, hub id, .gguf)")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if available; under torchrun "
                                                   "cuda means cuda:LOCAL_RANK)")
    ap.add_argument("--save_adapters", action="store_true", help="keep every trained adapter (PEFT format) under "
                                                                 "<run>/adapters/")
    ap.add_argument("--cache_dir", default=None, help="bootstrap candidate cache (default "
                                                      "$CODE_EDIT_CACHE/bootstrap/<datatype>)")
    ap.add_argument("--on_error", choices=("stop", "skip"), default="stop",
                    help="a case that raises: stop the run (default) or log it to failures.jsonl and go on")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks (also CODE_EDIT_DEBUG=1)")
    return ap


def build_preflight_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m code_edit preflight",
                                 description="Check GPU memory, weights access, datasets and the judge endpoint.")
    ap.add_argument("--model_type", action="append", default=None,
                    help=f"preset to check (repeatable; default: {' '.join(REPRODUCE_PRESETS)})")
    ap.add_argument("--datatype", action="append", default=None,
                    help=f"dataset to check (repeatable; default: {' '.join(REPRODUCE_DATASETS)})")
    ap.add_argument("--judge-base-url", default=None, help="OpenAI-compatible judge base URL")
    ap.add_argument("--api-key-file", default=None, help="judge key file (else $CODE_EDIT_API_KEYS / $OPENAI_API_KEY)")
    ap.add_argument("--no-gpu", action="store_true", help="a missing GPU is a note, not a failure (CPU smoke runs)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Arguments first: --help and a bad flag answer before torch is imported.
    preflight_args = build_preflight_parser().parse_args(argv[1:]) if argv[:1] == ["preflight"] else None
    args = build_parser().parse_args(argv) if preflight_args is None else None
    from code_edit.config import HparamsError
    from code_edit.data import DatasetError
    from code_edit.run_folder import RunError

    if preflight_args is not None:
        from code_edit.preflight import preflight, report

        a = preflight_args
        try:
            checks = preflight(a.model_type or REPRODUCE_PRESETS, a.datatype or REPRODUCE_DATASETS,
                               judge_base_url=a.judge_base_url, api_key_file=a.api_key_file, need_gpu=not a.no_gpu)
        except HparamsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        text, ok = report(checks)
        print(text)
        return 0 if ok else 1

    from code_edit.run import execute
    from code_edit.run_folder import UnitFailed

    debug = args.debug or os.environ.get("CODE_EDIT_DEBUG", "") not in ("", "0")
    try:
        execute(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except UnitFailed as e:
        if debug:
            raise
        print(f"error: {e} (traceback in the run's run.log)", file=sys.stderr)
        return 2
    except (RunError, HparamsError, DatasetError, ValueError, FileNotFoundError, KeyError, OSError) as e:
        if debug:
            raise
        if isinstance(e, KeyError):  # a missing field: name it as one, and say where the traceback is
            msg = f"missing key {e.args[0] if e.args else ''!r} (KeyError; --debug shows where)"
        else:
            msg = str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # hub access errors carry no common base class worth importing here
        name = type(e).__name__
        if name in ("GatedRepoError", "RepositoryNotFoundError", "LocalEntryNotFoundError", "HfHubHTTPError"):
            print(f"error: cannot get the model weights ({name}): {e}\nGated models (meta-llama/...) need an accepted "
                  "license and a token (export HF_TOKEN=... or `huggingface-cli login`); offline machines need the "
                  "weights in the HF cache or --model_path DIR. `python -m code_edit preflight` checks this.",
                  file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

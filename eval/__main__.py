"""Command line: `python -m eval grade | judge | analyze | extract-ce | judge-agreement | serve` (the reference's
flags of docs/method.md 7.2). Judging uses an OpenAI-compatible endpoint when a key or --base-url is given, else the
strict offline grader (docs/grading.md)."""
from __future__ import annotations

import argparse
import logging
import sys


def _on_off(value: str) -> bool:
    v = value.lower()
    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return v == "on"


def _judge_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge endpoint (no key and no --base-url: the strict offline grader)")
    g.add_argument("--judge-model", default=None, help="model name (default deepseek-v4-flash)")
    g.add_argument("--base-url", default=None,
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default https://api.deepseek.com "
                        "when a key is set)")
    g.add_argument("--api-key-file", default=None,
                   help="file with one API key per line; else $CODE_EDIT_API_KEYS (comma-separated) or $OPENAI_API_KEY")
    g.add_argument("--max-workers", type=int, default=None, help="parallel requests (default 16 per key)")
    g.add_argument("--rule-based", action="store_true", help="use the strict offline grader even if a key is set")
    g.add_argument("--substring", action="store_true",
                   help="offline, the reference's rule instead: a gold alias anywhere in the answer (for comparison "
                        "with published numbers; it credits 'NA' inside 'manager', see docs/grading.md)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/timeouts")
    g.add_argument("--guided-choice", action="store_true",
                   help="constrain each reply to the well-formed verdicts (vLLM's guided_choice field, which `eval "
                        "serve` implements): for small local judges that cannot keep the format; no written reasoning")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    gr = sub.add_parser("grade", help="strict-grade any answers: JSONL {id, question, answer, refs, old_refs?} in, "
                                      "the same plus correct, asserts_old, rule out")
    gr.add_argument("--input", required=True, help="input JSONL")
    gr.add_argument("--output", required=True, help="output JSONL (written atomically)")

    j = sub.add_parser("judge", help="PASS/FAIL-judge hop-wise and multi-hop answers; H-Acc and M-Acc")
    j.add_argument("--input", required=True, help="<run>/metrics.json")
    j.add_argument("--summary", default=None, help="summary path (default <run>/judge/metrics.judged.summary.json)")
    j.add_argument("--data_path", default=None,
                   help="the run's MQuAKE json: old answers for runs whose answers do not record them (old_ref)")
    _judge_flags(j)

    a = sub.add_parser("analyze", help="self-refutation (SRR), rationale alignment, CE comparison")
    a.add_argument("--input", required=True, help="<run>/metrics.json")
    a.add_argument("--output", default=None, help="report path (default <run>/analysis/pred_analysis.txt)")
    a.add_argument("--llm-self-refute", type=_on_off, default=False,
                   help="on: judge self-refutation with the LLM endpoint; off (default): the strict offline grader")
    a.add_argument("--llm-checkpoint", default=None, help="self-refutation checkpoint JSONL path")
    a.add_argument("--rewrite-why", type=_on_off, default=False, help="on: rationale alignment of Why? answers")
    a.add_argument("--llm-resume", type=_on_off, default=True, help="reuse checkpointed verdicts (default on)")
    _judge_flags(a)

    e = sub.add_parser("extract-ce", help="write <run>_only_causal_enhanced/metrics.json from the CE probes")
    e.add_argument("--input", required=True, help="<run>/metrics.json")

    ag = sub.add_parser("judge-agreement", help="each judge's agreement, precision and recall against the hand "
                                                "labels (the strict grader, the substring rule, recorded judges, "
                                                "and the endpoint when one is given)")
    ag.add_argument("--labels", default=None, help="labelled JSONL (default tests/data/judge_validation.jsonl)")
    ag.add_argument("--json", default=None, help="also write the table here as JSON")
    _judge_flags(ag)

    s = sub.add_parser("serve", help="OpenAI-compatible /v1/chat/completions server over a local model")
    s.add_argument("--model", required=True, help="HF directory, hub id, .gguf path or smollm2-135m-instruct")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-new-tokens", type=int, default=1024, help="default when a request sets no max_tokens")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    s.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask (else 400)")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (else 413)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting or running at once (more: 503)")
    s.add_argument("--slice-tokens", type=int, default=256,
                   help="greedy tokens per request per generate call: a long request lets short ones in between")
    return ap


def _backend(args: argparse.Namespace, *, llm: bool = True):
    from .judge import make_backend
    return make_backend(base_url=args.base_url, judge_model=args.judge_model, api_key_file=args.api_key_file,
                        rule_based=args.rule_based or not llm, max_workers=args.max_workers,
                        timeout=args.timeout, max_retries=args.max_retries, guided=args.guided_choice,
                        substring=args.substring)


def _grade(args: argparse.Namespace) -> int:
    from .grade import grade_file
    n = grade_file(args.input, args.output)
    print(f"graded {n['answers']} answers: {n['correct']} correct, {n['asserts_old']} assert the old answer "
          f"-> {args.output}")
    return 0


def _judge(args: argparse.Namespace) -> int:
    from .judge import run_judge, summary_lines
    from .mquake import load_mquake
    backend = _backend(args)
    print(f"judge: {backend.label}", file=sys.stderr)
    cases = load_mquake(args.data_path) if args.data_path else None
    summary = run_judge(args.input, backend, summary_path=args.summary, cases=cases)
    print("\n".join(summary_lines(summary)))
    items = summary["items"]
    if items["total"] and items["ERROR"] == items["total"]:
        print(f"error: every one of the {items['total']} items failed (see the errors above); nothing was judged",
              file=sys.stderr)
        return 2
    return 0


def _agreement(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .agreement import LABELS, SRR_LABELS, agreement_table, judge_verdicts, load_labels, srr_agreement, table_lines
    from .files import atomic_write_json
    rows = load_labels(args.labels or LABELS)
    table = agreement_table(rows, judge_verdicts(rows, _backend(args)))
    if not args.labels:
        table += srr_agreement(load_labels(SRR_LABELS, ("asserts_new", "self_refutes")))
    print("\n".join(table_lines(rows, table)))
    if args.json:
        atomic_write_json(args.json, [asdict(a) for a in table])
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import report_lines, run_analyze
    backend = _backend(args, llm=args.llm_self_refute)
    why = _backend(args) if args.rewrite_why else None
    if (args.llm_self_refute and backend.client is None) or (why is not None and why.client is None):
        print("no API key and no --base-url: self-refutation by the strict offline grader (labelled strict), "
              "rationale alignment by word overlap (labelled word-overlap)", file=sys.stderr)
    res = run_analyze(args.input, backend, output=args.output, checkpoint=args.llm_checkpoint,
                      resume=args.llm_resume, rewrite_why=why)
    print("\n".join(report_lines(res)))
    n_items = sum(res["item_counts"].values())
    if n_items and res["item_errors"] == n_items:
        print(f"error: every one of the {n_items} items failed; nothing was judged", file=sys.stderr)
        return 2
    return 0


def _extract_ce(args: argparse.Namespace) -> int:
    from .analyze import extract_ce
    print(extract_ce(args.input))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve
    for flag in ("max_tokens_cap", "max_body_bytes", "max_queue", "slice_tokens", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_new_tokens > args.max_tokens_cap:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is above --max-tokens-cap {args.max_tokens_cap}")
    serve(args.model, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens, device=args.device,
          dtype=args.dtype, max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes,
          max_queue=args.max_queue, slice_tokens=args.slice_tokens)
    return 0


COMMANDS = {"grade": _grade, "judge": _judge, "judge-agreement": _agreement, "analyze": _analyze,
            "extract-ce": _extract_ce, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .chat import ChatError  # after parsing: --help needs no HTTP stack
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        kept = args.cmd == "judge" or (args.cmd == "analyze" and getattr(args, "llm_checkpoint", None))
        print("interrupted; rerun the same command to resume (finished verdicts are kept in the checkpoint)"
              if kept else "interrupted", file=sys.stderr)
        return 130
    except (ChatError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

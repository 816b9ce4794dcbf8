"""`python -m scaffold`: Wikidata grounding -> causal articles (+ verification) -> merged dataset.

Flags follow the reference's generate.py (docs/method.md 7.3). Every stage resumes from its output file,
so rerunning the same command after Ctrl-C or a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from eval.chat import ChatClient, ChatError, resolve_api_keys
from eval.mquake import MQuAKEFormatError, attach_articles, load_mquake
from scaffold.articles import ArticleConfig, failures_path, generate_articles, plan_rewrites
from eval.files import atomic_write_json
from scaffold.wikidata import CONTACT_ENV, WIKIDATA_API, WikidataClient, WikidataConfig, WikidataError, ground


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scaffold", description=__doc__.splitlines()[0])
    p.add_argument("--mquake_file", required=True, help="MQuAKE-format JSON list of cases")
    p.add_argument("--grounding_info_file", default=None,
                   help="Wikidata profiles cache (QID -> record); required unless --no_wikidata")
    p.add_argument("--generated_articles_file", required=True,
                   help='articles keyed "{case_id}_{rewrite_idx}"; failures go to <name>.failed.json')
    p.add_argument("--merged_file", required=True, help="output: the cases with `article` per rewrite")
    p.add_argument("--base_url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--generate_model_name", required=True)
    p.add_argument("--verify_model_name", default=None, help="default: the generation model")
    p.add_argument("--api_key", default=None,
                   help="key(s), comma-separated; prefer --api_key_file or $CODE_EDIT_API_KEYS / $OPENAI_API_KEY")
    p.add_argument("--api_key_file", default=None, help="file with one API key per line")
    p.add_argument("--wikidata_url", default=WIKIDATA_API, help="wbgetentities endpoint (api.php)")
    p.add_argument("--contact", default=None,
                   help=f"email or URL for the Wikidata User-Agent (default ${CONTACT_ENV}); "
                        "required by Wikimedia's policy")
    p.add_argument("--no_wikidata", action="store_true",
                   help="skip grounding; write articles without entity profiles (offline use)")
    p.add_argument("--max_cases", type=int, default=None, help="only the first N cases (a trial run)")
    p.add_argument("--max_attempts", type=int, default=10, help="generate+verify attempts per rewrite")
    p.add_argument("--max_workers", type=int, default=1, help="rewrites written concurrently")
    p.add_argument("--max_tokens", type=int, default=None, help="max_tokens sent with every chat request")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per chat request")
    p.add_argument("--backoff_min", type=float, default=4.0, help="seconds between attempts, lower bound")
    p.add_argument("--backoff_max", type=float, default=10.0, help="seconds between attempts, upper bound")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.no_wikidata and not args.grounding_info_file:
        p.error("--grounding_info_file is required (or pass --no_wikidata to write without profiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        cases = load_mquake(args.mquake_file)
        if args.max_cases is not None:
            cases = cases[:args.max_cases]
        keys = resolve_api_keys(args.api_key_file, args.api_key)

        grounding = None
        if not args.no_wikidata:
            wiki = WikidataClient(WikidataConfig(url=args.wikidata_url, contact=args.contact))
            grounding, _ = ground(cases, args.grounding_info_file, wiki, source=args.mquake_file,
                                  progress=progress)

        tasks = plan_rewrites(cases, grounding, source=args.mquake_file)
        generator = ChatClient(args.base_url, args.generate_model_name, api_keys=keys, timeout=args.timeout)
        verifier = ChatClient(args.base_url, args.verify_model_name or args.generate_model_name,
                              api_keys=keys, timeout=args.timeout)
        cfg = ArticleConfig(max_attempts=args.max_attempts, backoff_min=args.backoff_min,
                            backoff_max=args.backoff_max, max_tokens=args.max_tokens,
                            max_workers=args.max_workers)
        failed_file = failures_path(args.generated_articles_file)
        articles, _ = generate_articles(tasks, args.generated_articles_file, generator, verifier, cfg,
                                               failed_file=failed_file, progress=progress)

        merged, missing = attach_articles(cases, articles)
        atomic_write_json(args.merged_file, merged)
    except KeyboardInterrupt:
        print("\ninterrupted: everything finished so far is saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    except ChatError as e:  # a fatal API answer (bad key, unknown model): every rewrite would fail
        print(f"error: chat API: {e}", file=sys.stderr)
        return 1
    except (WikidataError, MQuAKEFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    total = len(tasks)
    print(f"merged {len(merged)} cases into {args.merged_file}: {total - len(missing)}/{total} rewrites "
          f"have an article", file=sys.stderr)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(f"{len(missing)} rewrites without an article ({shown}); reasons in {failed_file}; "
              f"run again to retry them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

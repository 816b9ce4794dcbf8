"""Hand-built MQuAKE cases with short articles for the editor/CLI tests (small prompts keep the tiny
model fast); a test preset on top of `tiny`; a helper that runs `python -m code_edit` in process."""
import json

HPARAMS = """extends = "tiny"
[bootstrap]
max_new_tokens = 16
[internalize]
max_completion_length = 8
[eval]
max_new_tokens = 6
"""


def rewrite(subject, new, old, rel="P1", n_extra=0):
    rw = {"prompt": "{} is owned by", "subject": subject, "relation_id": rel,
          "question": f"Who owns {subject}?", "target_new": {"str": new, "id": "Q1"},
          "target_true": {"str": old, "id": "Q2"},
          "article": f"<h1>{new} buys {subject}</h1><p>{subject} now belongs to {new}, not {old}.</p>"}
    if n_extra:
        rw["rephrase_prompt"] = [{"question": f"Which company owns {subject} now? ({i})", "answer": new}
                                 for i in range(n_extra)]
        rw["learning_prompt"] = [{"question": f"Where is the owner of {subject} based? ({i})", "answer": "Paris"}
                                 for i in range(n_extra)]
    return rw


def case(cid, rewrites, hops=2):
    new = rewrites[0]["target_new"]["str"]
    return {
        "case_id": cid,
        "requested_rewrite": rewrites,
        "questions": [f"Who leads the owner of {rewrites[0]['subject']}?"],
        "new_answer": f"Boss of {new}", "new_answer_alias": [],
        "new_single_hops": [{"question": f"Who owns {rewrites[0]['subject']}?", "cloze": f"{rewrites[0]['subject']} is owned by",
                             "answer": new, "answer_alias": []}]
        + [{"question": f"Who leads {new}?", "cloze": f"{new} is led by", "answer": f"Boss of {new}",
            "answer_alias": []}] * (hops - 1),
    }


def dataset():
    """Four 2-hop cases; case 3 has two rewrites (one shared with case 1: the same edit key)."""
    return [
        case(1, [rewrite("Acme", "Globex", "Initech", n_extra=1)]),
        case(2, [rewrite("Umbrella", "Stark", "Wayne")]),
        case(3, [rewrite("Tyrell", "Cyberdyne", "Weyland"), rewrite("Acme", "Globex", "Initech")]),
        case(4, [rewrite("Hooli", "Pied Piper", "Aviato")]),
    ]


def write_dataset(tmp_path, cases=None):
    p = tmp_path / "handmade.json"
    p.write_text(json.dumps(cases if cases is not None else dataset()))
    return p


def write_hparams(tmp_path, text=HPARAMS):
    p = tmp_path / "test-tiny.toml"
    p.write_text(text)
    return p


def cli_args(tmp_path, method, *extra, max_cases=1):
    return ["--editing_method", method, "--datatype", "handmade", "--data_path", str(write_dataset(tmp_path)),
            "--hparams_path", str(write_hparams(tmp_path)), "--model_type", "test-tiny",
            "--max_cases", str(max_cases), "--output_root", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", *extra]

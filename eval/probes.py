"""Evaluation probes for one MQuAKE case (docs/method.md 4.2), answered in batches, scored by alias
substring match, and stored as the per-case `post` dict, `metrics.json` and `res.json` (4.3)."""
from __future__ import annotations

import copy
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .files import atomic_write_json, read_json
from .mquake import old_refs_for
from .mquake import target_str

# Wording the reference uses verbatim (docs/method.md 4.2).
STEP = "Let's think step by step."
CE_PREFIX = ("Use the following article as authoritative updated knowledge for answering the question. "
             "It is an absolute fact. Do not doubt whether it is true.")
TELL_FIRST = "Tell me about {subject} first, and then answer."
ANSWER_FIRST = "Answer first, and then tell me about {subject}."

# Order of the `post` keys; the conflict/old-knowledge lists are grouped by rewrite (8 and 2 each).
HOP, HOP_CE, MULTI, CONFLICT, CONFLICT_CE, OLD = (
    "hop_wise_pred", "causal_enhanced_hop_wise_pred", "accuracy_pred",
    "conflict_probe", "causal_enhanced_conflict_probe", "old_knowledge_probe")
CONFLICT_PER_REWRITE = 8
OLD_PER_REWRITE = 2


@dataclass
class GenConfig:
    """Decoding for evaluation: greedy, 768 new tokens, repetition penalty 1.1 (docs/method.md 4.1)."""
    max_new_tokens: int = 768
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.1
    batch_size: int | None = None  # prompts per generate call; None: all (the engine plans memory)
    seed: int | None = None


@dataclass
class Probe:
    source: str            # one of the post keys above
    prompt: str            # the user message sent to the model
    ref: list[str]         # gold strings
    q: str | None = None   # raw cloze/question (hop-wise and multi-hop only)
    old_ref: list[str] | None = None  # the replaced answer's strings (hop-wise and multi-hop only)
    hop: int | None = None  # index into new_single_hops (hop-wise sources only)
    rewrite: int | None = None  # requested_rewrite index (conflict/old-knowledge, CE hop if matched)


# ---------------------------------------------------------------------------- matching

def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (any Unicode P* character), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def answer_matches(pred: str, refs: Iterable[str]) -> bool:
    """The generation-time rule: some non-empty ref is a case-insensitive substring of pred."""
    low = pred.lower()
    return any(r.strip() and r.lower() in low for r in refs)


def hop_refs(hop: dict) -> list[str]:
    return list(hop["answer_alias"]) + [hop["answer"]]


def multi_refs(case: dict) -> list[str]:
    return list(case["new_answer_alias"]) + [case["new_answer"]]


def hop_rewrite(case: dict, hop: dict) -> int | None:
    """Index of the rewrite whose normalised target_new equals a normalised ref of the hop."""
    refs = {normalize_answer(r) for r in hop_refs(hop)}
    for r, rw in enumerate(case["requested_rewrite"]):
        if normalize_answer(target_str(rw["target_new"])) in refs:
            return r
    return None


def with_article(prompt: str, article: str | None) -> str:
    return f"{CE_PREFIX}\n\n{article}\n\n{prompt}" if article else prompt


# ---------------------------------------------------------------------------- probes

def build_probes(case: dict) -> list[Probe]:
    """Every probe of docs/method.md 4.2 for one case, in storage order."""
    out: list[Probe] = []
    rws = case["requested_rewrite"]
    hops = case["new_single_hops"]
    hop_forms = []
    for h, hop in enumerate(hops):
        forms = [(hop["cloze"], f"Now, {hop['cloze']} ? {STEP}"),
                 (hop["question"], f"Now, {hop['question']} {STEP}"),
                 (hop["question"], f"Now, {hop['question']} Why? {STEP}")]
        hop_forms.append(forms)
        out += [Probe(HOP, p, hop_refs(hop), q=q, hop=h, old_ref=old_refs_for(case, h)) for q, p in forms]
    for h, hop in enumerate(hops):
        r = hop_rewrite(case, hop)
        article = rws[r].get("article") if r is not None else None
        out += [Probe(HOP_CE, with_article(p, article), hop_refs(hop), q=q, hop=h, rewrite=r,
                      old_ref=old_refs_for(case, h)) for q, p in hop_forms[h]]
    out += [Probe(MULTI, f"Now, {q} {STEP}", multi_refs(case), q=q, old_ref=old_refs_for(case, None))
            for q in case["questions"]]
    for r, rw in enumerate(rws):
        for p in conflict_prompts(rw):
            out.append(Probe(CONFLICT, p, [target_str(rw["target_new"])], rewrite=r))
    for r, rw in enumerate(rws):
        for p in conflict_prompts(rw):
            out.append(Probe(CONFLICT_CE, with_article(p, rw.get("article")), [target_str(rw["target_new"])],
                             rewrite=r))
    for r, rw in enumerate(rws):
        new, cloze = target_str(rw["target_new"]), rw["prompt"].format(rw["subject"])
        for p in (f"Now it is {new}. Before the update, {cloze} ? {STEP}",
                  f"Now the answer is {new}. Before the update, {rw['question']} {STEP}"):
            out.append(Probe(OLD, p, [target_str(rw["target_true"])], rewrite=r))
    return out


def conflict_prompts(rw: dict) -> list[str]:
    """8 prompts: {multiple-choice, cloze "X or Y?"} x {old first, new first} x {tell first, answer first}."""
    old, new, subject = target_str(rw["target_true"]), target_str(rw["target_new"]), rw["subject"]
    cloze = rw["prompt"].format(subject)
    out = []
    for fmt in ("choice", "cloze"):
        for x, y in ((old, new), (new, old)):
            for instr in (TELL_FIRST, ANSWER_FIRST):
                instr = instr.format(subject=subject)
                out.append(f"{rw['question']}\n(A) {x} (B) {y}\n{instr}" if fmt == "choice"
                           else f"{cloze} {x} or {y}? {instr}")
    return out


def assemble_post(case: dict, probes: list[Probe], preds: list[str]) -> dict:
    """The per-case `post` dict of docs/method.md 4.3 from probes and their answers (same order)."""
    if len(probes) != len(preds):
        raise ValueError(f"case_id {case.get('case_id')}: {len(probes)} probes but {len(preds)} answers")
    n_hops = len(case["new_single_hops"])
    post: dict[str, Any] = {"hop_wise": [[] for _ in range(n_hops)], HOP: [[] for _ in range(n_hops)],
                            "accuracy": [], MULTI: [], CONFLICT: [], HOP_CE: [[] for _ in range(n_hops)],
                            CONFLICT_CE: [], OLD: []}
    for p, pred in zip(probes, preds):
        if p.source in (HOP, HOP_CE, MULTI):
            item = {"q": p.q, "prompt": p.prompt, "ref": list(p.ref), "pred": pred, "old_ref": list(p.old_ref or [])}
            if p.source == MULTI:
                post[MULTI].append(item)
                post["accuracy"].append(answer_matches(pred, p.ref))
            else:
                post[p.source][p.hop].append(item)
                if p.source == HOP:
                    post["hop_wise"][p.hop].append(answer_matches(pred, p.ref))
        else:
            post[p.source].append({"prompt": p.prompt, "ref": list(p.ref), "pred": pred})
    return post


# ---------------------------------------------------------------------------- generation

AnswerFn = Callable[[list[str]], list[str]]


def model_chat_fn(model: Any, tokenizer: Any, gen: GenConfig) -> Callable[[list[list[dict]]], list[str]]:
    """Answer whole conversations (chat messages) with the project's engine: chat template, batched
    generate, decode."""
    def answer(conversations: list[list[dict]]) -> list[str]:
        from model import generate  # lazy: the pure parts of eval import without torch models
        ids = [tokenizer.encode(tokenizer.chat(msgs, add_generation_prompt=True)) for msgs in conversations]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[str] = [""] * len(ids)
        size = max(1, gen.batch_size or len(order))
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            comps = generate(model, [ids[i] for i in chunk], max_new_tokens=gen.max_new_tokens,
                             temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                             repetition_penalty=gen.repetition_penalty, num_samples=1,
                             stop_ids=list(tokenizer.eos_ids), seed=gen.seed)
            if len(comps) != len(chunk):
                raise RuntimeError(f"generate returned {len(comps)} completions for {len(chunk)} prompts")
            for c in comps:
                out[chunk[c.prompt_index]] = tokenizer.decode(c.tokens, skip_special_tokens=True).strip()
        return out
    return answer


def model_answer_fn(model: Any, tokenizer: Any, gen: GenConfig) -> AnswerFn:
    """Answer user messages (each the single user turn of its conversation)."""
    chat = model_chat_fn(model, tokenizer, gen)
    return lambda prompts: chat([[{"role": "user", "content": p}] for p in prompts])


def evaluate_case(model: Any, tokenizer: Any, case: dict, gen: GenConfig | None = None,
                  answer_fn: AnswerFn | None = None) -> dict:
    """Ask every probe of `case` and return its `post` dict. `answer_fn(prompts) -> preds` replaces
    the model when given (tests). Identical prompts (e.g. CE copies of unedited hops, which carry no
    article) are asked once: greedy decoding gives them the same answer anyway."""
    probes = build_probes(case)
    unique = list(dict.fromkeys(p.prompt for p in probes))
    fn = answer_fn or model_answer_fn(model, tokenizer, gen or GenConfig())
    answers = fn(unique)
    if len(answers) != len(unique):
        raise RuntimeError(f"case_id {case['case_id']}: {len(unique)} prompts but {len(answers)} answers")
    by_prompt = dict(zip(unique, answers))
    return assemble_post(case, probes, [by_prompt[p.prompt] for p in probes])


# ---------------------------------------------------------------------------- stored outputs

def case_record(case: dict, post: dict, seconds: float) -> dict:
    """One metrics.json entry: {case_id, requested_rewrite (target_new as a string), time, post}."""
    rws = copy.deepcopy(case["requested_rewrite"])
    for rw in rws:
        rw["target_new"] = target_str(rw["target_new"])
    return {"case_id": case["case_id"], "requested_rewrite": rws, "time": float(seconds), "post": post}


def string_match_summary(records: list[dict]) -> dict:
    """res.json: H-Acc and M-Acc by generation-time substring match, as numbers (the reference
    stores strings). hop-wise = mean over cases of True/slots; qa = share of cases with any True.
    `strict`: the same by the strict grader, in the judge summary's keys (M-Acc = any_right_accuracy)."""
    from .judge import offline_summary  # judge reads records through this module
    hop, qa = [], []
    for rec in records:
        slots = [b for hop_slots in rec["post"]["hop_wise"] for b in hop_slots]
        if slots:
            hop.append(sum(bool(b) for b in slots) / len(slots))
        if rec["post"]["accuracy"]:
            qa.append(float(any(rec["post"]["accuracy"])))
    return {"total_cases": len(records),
            "overall_hop_wise_average": sum(hop) / len(hop) if hop else None,
            "accuracy_averages": {"qa": sum(qa) / len(qa) if qa else None},
            "strict": offline_summary(records)}


def record_case(run_dir: str | Path, record: dict) -> list[dict]:
    """Add one record to run_dir/metrics.json and rewrite res.json, both atomically, so a crash
    leaves the previous complete files and a rerun can skip finished cases. A record replaces an
    earlier one with the same (case_id, group); `group` is optional (batch edits evaluate a case
    once per edit group)."""
    run_dir = Path(run_dir)
    ident = (record["case_id"], record.get("group"))
    records = [r for r in load_records(run_dir / "metrics.json") if (r["case_id"], r.get("group")) != ident]
    records.append(record)
    atomic_write_json(run_dir / "metrics.json", records)
    atomic_write_json(run_dir / "res.json", string_match_summary(records))
    return records


def load_records(path: str | Path) -> list[dict]:
    """metrics.json as a list (empty if the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    data = read_json(path, "metrics.json")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of per-case records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "case_id" not in rec or not isinstance(rec.get("post"), dict):
            raise ValueError(f"{path}: record #{i}: needs 'case_id' and a 'post' object")
    return data

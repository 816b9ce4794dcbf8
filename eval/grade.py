"""The strict offline grader: does an answer assert the gold answer as *its* answer? Whole-word alias
matching, then the answer's explicit conclusion, else its first sentence that answers the question,
decides; mentions in negations, questions and lists of alternatives are not assertions (docs/grading.md)."""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .files import atomic_write_jsonl
from .mquake import target_str

SHORT_ALIAS = 3  # aliases of at most this many letters/digits match case-sensitively ("UK", "IN")


@dataclass
class Grade:
    """One graded answer. `rule` names what decided it and quotes the deciding span."""
    correct: bool
    asserts_old: bool
    rule: str
    asserts_new: bool = False     # the gold answer is asserted somewhere (SRR's "stated the new fact")
    negates_new: bool = False     # ... and negated after that assertion
    self_refutes: bool = False    # asserted, then negated or concluded otherwise; not recovered


# ---------------------------------------------------------------------------- text

@dataclass
class _Tok:
    fold: str    # case-folded, accents stripped
    orig: str    # as written (short aliases match this)
    start: int   # character offsets in the normalised text
    end: int
    sent: int    # sentence index
    line: int    # line index
    pre: str     # the text between the previous word and this one


_WORD = re.compile(r"[^\W_]+")
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "no", "inc", "ltd", "co", "mt", "ft", "gen", "lt"}
_LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022]|\(?[A-Ea-e]\)|[A-E]\.|step\s+\d+\s*:?)\s*", re.IGNORECASE)
_OPTION = re.compile(r"^\s*(?:\(?[A-Ea-e]\)|[A-E]\.)\s")


def normalise(text: str) -> str:
    """NFKC, accents dropped, "n't" spelled "not", typographic quotes made plain."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"(?i)n't\b", " not", text)


def tokens(text: str) -> list[_Tok]:
    """Words of normalised text with their sentence and line. Sentences end at a line break or at
    . ! ? followed by a space, except after an initial ("Russell T. Davies") or an abbreviation."""
    out: list[_Tok] = []
    sent = line = last = 0
    for m in _WORD.finditer(text):
        gap = text[last:m.start()]
        if out and _ends_sentence(gap, out[-1]):
            sent += 1
        line += gap.count("\n")
        out.append(_Tok(m.group().casefold(), m.group(), m.start(), m.end(), sent, line, gap))
        last = m.end()
    return out


def _ends_sentence(gap: str, prev: _Tok) -> bool:
    if "\n" in gap:
        return True
    if not re.search(r"[.!?]\s", gap + " "):
        return False
    if "?" in gap or "!" in gap:
        return True
    initial = len(prev.orig) == 1 and prev.orig.isupper()
    return not (initial or prev.fold in _ABBREV)


def alias_tokens(alias: str) -> tuple[list[str], bool]:
    """The words an alias must match and whether it matches case-sensitively; a leading "the" is dropped."""
    words = _WORD.findall(normalise(alias))
    if len(words) > 1 and words[0].casefold() == "the":
        words = words[1:]
    exact = sum(len(w) for w in words) <= SHORT_ALIAS
    return (words if exact else [w.casefold() for w in words]), exact


@dataclass
class _Mention:
    first: int   # token index of the first word
    last: int    # token index of the last word
    gold: bool   # a gold alias (else an old one)


def mentions(toks: list[_Tok], refs: Iterable[str], old_refs: Iterable[str]) -> list[_Mention]:
    """Whole-word occurrences of any gold or old alias, in text order; of overlapping ones the longest
    (the earlier on a tie) is kept."""
    found: list[_Mention] = []
    for alias, gold in [(a, True) for a in refs] + [(a, False) for a in old_refs]:
        words, exact = alias_tokens(alias)
        if not words:
            continue
        n = len(words)
        for i in range(len(toks) - n + 1):
            if all((toks[i + k].orig if exact else toks[i + k].fold) == words[k] for k in range(n)):
                found.append(_Mention(i, i + n - 1, gold))
    found.sort(key=lambda m: (m.first, -(m.last - m.first)))
    kept: list[_Mention] = []
    for m in found:
        if not kept or m.first > kept[-1].last:
            kept.append(m)
    return kept


# ---------------------------------------------------------------------------- is a mention asserted?

_FILLER = {"the", "a", "an", "of", "by", "in", "from", "to", "at", "as", "with", "on", "being", "be"}
_NEG_BEFORE = [("not",), ("no", "longer"), ("never",), ("instead", "of"), ("rather", "than"), ("neither",),
               ("nor",), ("replacing",), ("replaced",), ("formerly",), ("previously",), ("former",),
               ("originally",), ("used", "to", "be"), ("than",), ("outside",), ("except",)]
_CHANGE = {"moved", "changed", "shifted", "switched", "transferred", "relocated", "went", "move", "shift",
           "transition", "transitioned", "changing", "moving"}
_BE = {"is", "was", "are", "were", "has", "had", "have", "does", "did", "do", "will", "would", "can", "could",
       "should", "may", "might"}
_NEG_WORDS = {"not", "no", "never", "incorrect", "wrong", "outdated", "false", "inaccurate", "mistaken",
              "obsolete", "untrue"}
# A name followed by one of these is part of a longer name ("Elvis Presley Records"), not the entity.
_NAME_PARTS = {"records", "productions", "studios", "studio", "company", "corporation", "inc", "university",
               "airport", "street", "stadium", "foundation", "group", "prize", "award", "awards", "museum",
               "center", "centre", "hall", "park", "square", "station", "club", "orchestra", "society",
               "institute", "agency", "network", "channel", "theatre", "theater", "bridge", "river", "road", "fc"}
_HYPOTHETICAL = re.compile(r"^\W*(?:if|suppose|supposing|imagine|assume|assuming|hypothetically)\b|"
                           r"\b(?:let's (?:assume|say|suppose|imagine)|assumption|need to|want to|have to find|"
                           r"could be|might be|may be)\b", re.IGNORECASE)
_OPTIONS_CUE = re.compile(r"\b(?:options?|choices|possibilities|candidates|possible answers)\b", re.IGNORECASE)
_AFTER_WINDOW = 4
_CLAUSE_WINDOW = 5


def _sentence(toks: list[_Tok], i: int) -> list[int]:
    s = toks[i].sent
    lo = hi = i
    while lo > 0 and toks[lo - 1].sent == s:
        lo -= 1
    while hi + 1 < len(toks) and toks[hi + 1].sent == s:
        hi += 1
    return list(range(lo, hi + 1))


def _negated(toks: list[_Tok], m: _Mention) -> bool:
    """A negation cue before the mention in its clause ("not X", "was not created by X", "no longer the
    X", "instead of X", "moved from X"), or a negated verb just after it ("X is not", "X is incorrect")."""
    sent = toks[m.first].sent
    j, skipped = m.first - 1, 0
    while True:  # cues that end right before the mention, with up to two filler words between
        for cue in _NEG_BEFORE:
            k = j - len(cue) + 1
            if k >= 0 and all(toks[k + i].sent == sent and toks[k + i].fold == cue[i] for i in range(len(cue))):
                if not (cue == ("replaced",) and j + 1 < m.first and toks[j + 1].fold == "by"):  # "replaced by X"
                    return True
        if j < 0 or toks[j].sent != sent or toks[j].fold not in _FILLER or skipped == 2:
            break
        j, skipped = j - 1, skipped + 1
    for k in range(m.first - 1, max(-1, m.first - 1 - _CLAUSE_WINDOW), -1):  # "not" earlier in the clause
        if toks[k].sent != sent or toks[k].fold in ("but", "however") or _clause_break(toks, k):
            break
        if toks[k].fold in ("not", "never", "neither", "nor") or (toks[k].fold == "longer" and k > 0
                                                                 and toks[k - 1].fold == "no"):
            return True
    if m.first > 0 and toks[m.first - 1].fold == "from" and any(
            toks[k].fold in _CHANGE for k in range(max(0, m.first - 4), m.first - 1) if toks[k].sent == sent):
        return True
    after = []
    for t in toks[m.last + 1:m.last + 1 + _AFTER_WINDOW]:  # the rest of the mention's clause
        if t.sent != sent or t.fold in ("but", "however") or re.search(r"[,;:()\[\]]", t.pre):
            break
        after.append(t.fold)
    for i, w in enumerate(after):
        if w in _BE and i + 1 < len(after) and after[i + 1] in _NEG_WORDS:
            return True
        if w in ("incorrect", "wrong", "outdated"):
            return True
    return False


def _clause_break(toks: list[_Tok], k: int) -> bool:
    """A , ; : or bracket between word k and the next one."""
    return k + 1 < len(toks) and bool(re.search(r"[,;:()\[\]]", toks[k + 1].pre))


def _modifier(text: str, toks: list[_Tok], m: _Mention) -> bool:
    """The name modifies something else: a possessive ("Tokyo's sister city"), a longer name, or a
    heading ("- Madonna:" above what the answer says about her)."""
    end = toks[m.last].end
    if text[end:end + 2] in ("'s", "' "):
        return True
    line_end = text.find("\n", end)
    if re.fullmatch(r"[\s*_]*:[\s*_]*", text[end:line_end if line_end >= 0 else len(text)]):
        return True
    nxt = toks[m.last + 1] if m.last + 1 < len(toks) else None
    return nxt is not None and nxt.sent == toks[m.last].sent and nxt.fold in _NAME_PARTS and nxt.orig[0].isupper()


def _alternative(text: str, toks: list[_Tok], m: _Mention, lines: list[str]) -> bool:
    """One option of a choice the answer does not make: "X or Y", "either X", a sentence that lists
    options ("choose from three options: X, Y or Z"), a lettered option ("B) X", "(A) X (B) Y"), or an item of a list whose items open with the same words ("1. The capital is X /
    2. The capital is Y")."""
    sent = toks[m.first].sent
    before = toks[m.first - 1].fold if m.first > 0 and toks[m.first - 1].sent == sent else ""
    after = toks[m.last + 1].fold if m.last + 1 < len(toks) and toks[m.last + 1].sent == sent else ""
    if before in ("or", "either", "versus", "vs") or after in ("or", "versus", "vs") or _in_series(toks, m):
        return True
    idx = _sentence(toks, m.first)
    if _OPTIONS_CUE.search(text[toks[idx[0]].start:toks[idx[-1]].end]):
        return True
    line = lines[toks[m.first].line]
    if _OPTION.match(line) or _in_column(lines, toks[m.first].line):
        return True
    if re.search(r"\(\s*[A-Ea-e]\s*\)\s*$", text[max(0, toks[m.first].start - 8):toks[m.first].start]):
        return True  # an inline option: "(A) X (B) Y"
    head = _list_head(line)
    return head is not None and sum(_list_head(other) == head for other in lines) >= 2


def _in_series(toks: list[_Tok], m: _Mention) -> bool:
    """An item of an inline enumeration: ", X," / ", X and" / "such as X," / "including X,"."""
    nxt = toks[m.last + 1] if m.last + 1 < len(toks) and toks[m.last + 1].sent == toks[m.first].sent else None
    comma_after = nxt is not None and "," in nxt.pre
    and_after = nxt is not None and nxt.fold in ("and", "or") and "," not in nxt.pre
    comma_before = "," in toks[m.first].pre and m.first > 0
    k = m.first
    introduced = k >= 1 and (toks[k - 1].fold in ("including", "like") or
                             (k >= 2 and (toks[k - 2].fold, toks[k - 1].fold) == ("such", "as")))
    return (comma_before and (comma_after or and_after)) or (introduced and comma_after)


def _in_column(lines: list[str], k: int, width: int = 4, rows: int = 3) -> bool:
    """Line k is one of at least `rows` consecutive lines of at most `width` words: a column of names."""
    def short(j: int) -> bool:
        return 0 <= j < len(lines) and 0 < len(_WORD.findall(lines[j])) <= width
    if not short(k):
        return False
    lo, hi = k, k
    while short(lo - 1):
        lo -= 1
    while short(hi + 1):
        hi += 1
    return hi - lo + 1 >= rows


def _list_head(line: str) -> tuple[str, ...] | None:
    """The first three words of a list item (None for a line that is not one)."""
    marker = _LIST_ITEM.match(line)
    if not marker or marker.end() == 0:
        return None
    words = tuple(w.casefold() for w in _WORD.findall(line[marker.end():])[:3])
    return words if len(words) == 3 else None


def _in_question(text: str, toks: list[_Tok], m: _Mention) -> bool:
    """The mention's sentence ends with a question mark."""
    last = _sentence(toks, m.first)[-1]
    stop = toks[last + 1].start if last + 1 < len(toks) else len(text)
    return "?" in text[toks[last].end:stop]


def _hypothetical(text: str, toks: list[_Tok], m: _Mention) -> bool:
    """The mention's sentence is a supposition or a plan, not a claim ("If ...", "we need to find ...")."""
    idx = _sentence(toks, m.first)
    return bool(_HYPOTHETICAL.search(text[toks[idx[0]].start:toks[idx[-1]].end]))


def _asserted(text: str, toks: list[_Tok], m: _Mention, lines: list[str]) -> bool:
    return not (_negated(toks, m) or _modifier(text, toks, m) or _alternative(text, toks, m, lines)
                or _in_question(text, toks, m) or _hypothetical(text, toks, m))


# ---------------------------------------------------------------------------- deciding

# A strong conclusion decides even when it names neither answer; a weak one only when it names one.
_STRONG = re.compile(r"\b(?:the\s+)?(?:final\s+|correct\s+|right\s+|updated\s+)?answer\s+(?:now\s+)?"
                     r"(?:is|would\s+be|will\s+be|should\s+be)\b\s*:?|(?:^|\n)[\s*#>]*(?:final\s+)?answer\s*\**\s*:|"
                     r"\b(?:in\s+conclusion|to\s+conclude|in\s+summary|to\s+summari[sz]e)\b\s*,?",
                     re.IGNORECASE)
_WEAK = re.compile(r"(?:^|(?<=[.!?:\n]))[\s*#>\-]*(?:so|therefore|thus|hence|overall|as\s+a\s+result)\b\s*,?",
                   re.IGNORECASE)
_STOP = set("""a an the of in on at to by for from with and or but is are was were be been being it its this that
these those what which who whom whose where when why how does do did has have had now let lets us think step
question answer s t about as into than then there their they he she his her him them we our you your i me my
not no yes one can could would should will may might also just""".split())
# The probes' fixed wording (eval/probes.py), which says nothing about the relation asked.
_BOILERPLATE = re.compile(r"^\s*now,\s*|\s*why\?|let's think step by step\.?|tell me about .*? first, and then "
                          r"answer\.?|answer first, and then tell me about .*?\.?$", re.IGNORECASE | re.MULTILINE)
_SHORT_ANSWER = 12  # a sentence of at most this many words that names an answer is taken as answering


def _relation_words(question: str) -> set[str]:
    """The question's lower-case content words, stemmed: its relation ("capital", "created", "citizen"),
    not its subject, which is a name and is written in capitals."""
    core = _BOILERPLATE.sub(" ", normalise(question))
    words = _WORD.findall(core)
    return {_stem(w.casefold()) for i, w in enumerate(words)
            if (w.islower() or (i == 0 and w.casefold() in _STOP)) and w.casefold() not in _STOP}


def _subject_words(question: str, names: Iterable[str]) -> set[str]:
    """The question's capitalised words that do not open a sentence, stemmed, less the words of `names`
    (a conflict probe lists both answers): its subject ("Blake's 7", "Canada")."""
    core = _BOILERPLATE.sub(" ", normalise(question))
    skip = {_stem(w.casefold()) for n in names for w in _WORD.findall(normalise(n))}
    out = set()
    for sentence in re.split(r"[.?!\n]+", core):
        words = _WORD.findall(sentence)
        out |= {_stem(w.casefold()) for w in words[1:] if (w[0].isupper() or w.isdigit()) and w.casefold() not in _STOP}
    return out - skip


def _stem(word: str) -> str:
    """Crude, but enough to meet "created"/"creator", "plays"/"playing", "citizen"/"citizenship"."""
    if word.isdigit():
        return word
    for suffix in ("ship", "ing", "ion", "ed", "er", "or", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:5]


def _answers_question(toks: list[_Tok], m: _Mention, relation: set[str]) -> bool:
    """The mention's sentence is short (a bare answer) or names the question's relation."""
    idx = _sentence(toks, m.first)
    if len(idx) <= _SHORT_ANSWER:
        return True
    return any(_stem(toks[i].fold) in relation for i in idx if not m.first <= i <= m.last)


def _states_fact(toks: list[_Tok], m: _Mention, relation: set[str], subject: set[str]) -> bool:
    """Stricter than answering: a bare answer (the name and at most three more content words, as in
    "The answer now is X."), or a sentence naming both the question's relation and its subject."""
    idx = _sentence(toks, m.first)
    if sum(toks[i].fold not in _STOP for i in idx if not m.first <= i <= m.last) <= 3:
        return True
    words = {_stem(toks[i].fold) for i in idx if not m.first <= i <= m.last}
    return bool(words & relation) and (not subject or bool(words & subject))


def _span(toks: list[_Tok], pos: int) -> list[int]:
    """Token indices from character `pos` to the end of the sentence of the first word after it (so a
    conclusion ending in a colon or a line break reads the next sentence)."""
    first = next((i for i, t in enumerate(toks) if t.start >= pos), None)
    if first is None:
        return []
    return [i for i in _sentence(toks, first) if i >= first]


def _quote(text: str, toks: list[_Tok], idx: list[int], start: int | None = None) -> str:
    if not idx:
        return text[start:].strip()[:100] if start is not None else ""
    a = toks[idx[0]].start if start is None else start
    s = " ".join(text[a:toks[idx[-1]].end].split())
    return s if len(s) <= 100 else s[:97] + "..."


def grade(question: str, answer: str, refs: Iterable[str], old_refs: Iterable[str] = ()) -> Grade:
    """Grade one answer (docs/grading.md "Rules"); the numbered steps are the decision order."""
    text = normalise(answer)
    toks = tokens(text)
    lines = text.split("\n")
    refs, old_refs = [r for r in refs if r.strip()], [r for r in old_refs if r.strip()]
    found = mentions(toks, refs, old_refs)
    asserted = [m for m in found if _asserted(text, toks, m, lines)]
    by_first = {m.first: m for m in asserted}
    relation = _relation_words(question)

    def named(span: list[int]) -> _Mention | None:
        return next((by_first[i] for i in span if i in by_first), None)

    subject = _subject_words(question, [*refs, *old_refs])

    def decided(hit: _Mention | None, rule: str, concluded: bool) -> Grade:
        return _finish(found, asserted, toks, relation, subject, hit, rule, concluded)

    # 1) the last strong conclusion ("the answer is X", "Answer: X", "In conclusion, X") decides
    strong = list(_STRONG.finditer(text))
    if strong:
        span = _span(toks, strong[-1].end())
        return decided(named(span), f"conclusion: {_quote(text, toks, span, strong[-1].start())!r}", True)
    # 2) else the last weak conclusion ("So, X", "Therefore X") that names the gold or the old answer
    for w in reversed(list(_WEAK.finditer(text))):
        span = _span(toks, w.end())
        if named(span) is not None:
            return decided(named(span), f"conclusion: {_quote(text, toks, span, w.start())!r}", True)
    # 3) else the first sentence that answers the question and asserts the gold or the old answer,
    #    unless the answer later withdraws that answer ("... X is not the creator")
    for m in asserted:
        withdrawn = any(n.gold == m.gold and n.first > m.last and _negated(toks, n) for n in found)
        if _answers_question(toks, m, relation) and not withdrawn:
            return decided(m, f"first answer: {_quote(text, toks, _sentence(toks, m.first))!r}", False)
    # 4) else the answer asserts neither
    return decided(None, "no answer asserted", False)


def _finish(found: list[_Mention], asserted: list[_Mention], toks: list[_Tok], relation: set[str],
            subject: set[str], hit: _Mention | None, rule: str, concluded: bool) -> Grade:
    """The verdict, and for SRR: whether the new answer is stated (asserted in a short sentence, or in
    one that names the question's subject and relation), negated after that, and whether the answer
    then refutes itself: it negates the new answer or explicitly concludes with the old one, and does
    not end on the new one."""
    correct = hit is not None and hit.gold
    old = hit is not None and not hit.gold
    stated = next((m for m in asserted if m.gold and _states_fact(toks, m, relation, subject)), None)
    negates = stated is not None and any(m.gold and m.first > stated.last and _negated(toks, m) for m in found)
    concludes_old = old and concluded and stated is not None and hit.first > stated.last
    side = " (gold)" if correct else " (old)" if old else ""
    return Grade(correct, old, rule + side, asserts_new=stated is not None, negates_new=negates,
                 self_refutes=stated is not None and not correct and (negates or concludes_old))


# ---------------------------------------------------------------------------- MQuAKE references

def alias_table(cases: Iterable[dict]) -> dict[str, list[str]]:
    """answer string -> its aliases, from every single hop of every case (old and new chains)."""
    table: dict[str, list[str]] = {}
    for case in cases:
        for hop in list(case.get("single_hops") or []) + list(case.get("new_single_hops") or []):
            if not isinstance(hop, dict) or not hop.get("answer"):
                continue
            known = table.setdefault(hop["answer"], [])
            known += [a for a in hop.get("answer_alias") or [] if a not in known]
    return table


def old_refs_for(case: dict, hop: int | None, aliases: dict[str, list[str]] | None = None) -> list[str]:
    """The strings of the answer the edit replaced: for hop `hop` the target_true of the rewrite whose
    target_new the hop asks for (none for an unedited hop); for a multi-hop question (hop None) the
    case's original answer. Aliases come from `aliases` (see alias_table) or the case's own hops."""
    aliases = aliases if aliases is not None else alias_table([case])
    if hop is None:  # `answer` is optional in MQuAKE files (the method never reads it)
        old = [case["answer"], *case.get("answer_alias", [])] if case.get("answer") else []
    else:
        new = case["new_single_hops"][hop]
        refs = {new["answer"], *new.get("answer_alias", [])}
        rws = [rw for rw in case["requested_rewrite"] if target_str(rw["target_new"]) in refs]
        if not rws:
            return []
        old = [target_str(rws[0]["target_true"])]
    return list(dict.fromkeys(old + [a for o in old for a in aliases.get(o, [])]))


# ---------------------------------------------------------------------------- `python -m eval grade`

GRADE_FIELDS = {"id": None, "question": str, "answer": str, "refs": list, "old_refs": list}


def read_grade_input(path: str | Path) -> list[dict]:
    """Lines {id, question, answer, refs, old_refs?}; a bad line raises ValueError naming line and field."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object")
            for key, kind in GRADE_FIELDS.items():
                if key not in row:
                    if key == "old_refs":
                        continue
                    raise ValueError(f"{path}: line {n}: missing field '{key}'")
                if kind is not None and not isinstance(row[key], kind):
                    raise ValueError(f"{path}: line {n}: field '{key}' must be {kind.__name__}, "
                                     f"got {type(row[key]).__name__}")
            for key in ("refs", "old_refs"):
                if any(not isinstance(r, str) for r in row.get(key, [])):
                    raise ValueError(f"{path}: line {n}: field '{key}' must be a list of strings")
            rows.append(row)
    return rows


def grade_row(row: dict) -> dict:
    g = grade(row["question"], row["answer"], row["refs"], row.get("old_refs", []))
    return {**row, "correct": g.correct, "asserts_old": g.asserts_old, "rule": g.rule}


def grade_file(input_path: str | Path, output_path: str | Path) -> dict:
    """Grade every line of `input_path` into `output_path` (written atomically); return counts."""
    rows = [grade_row(r) for r in read_grade_input(input_path)]
    atomic_write_jsonl(output_path, rows)
    return {"answers": len(rows), "correct": sum(r["correct"] for r in rows),
            "asserts_old": sum(r["asserts_old"] for r in rows)}


def stored_old_refs(records: list[dict], cases: list[dict] | None = None) -> dict[tuple, list[str]]:
    """(case_id, item path) -> the old answer's strings for the hop-wise and multi-hop items of stored
    records. With the run's MQuAKE `cases`, as old_refs_for gives them; without, hop items take the
    target_true of the rewrite whose target_new is among their refs, and multi-hop items get none."""
    by_id = {c["case_id"]: c for c in cases or []}
    aliases = alias_table(by_id.values())
    out: dict[tuple, list[str]] = {}
    for rec in records:
        case = by_id.get(rec["case_id"])
        post = rec.get("post") or {}
        for h, hop in enumerate(post.get("hop_wise_pred") or []):
            for s, d in enumerate(hop if isinstance(hop, list) else []):
                if case is not None and h < len(case["new_single_hops"]):
                    old = old_refs_for(case, h, aliases)
                else:
                    refs = set(d.get("ref") or []) if isinstance(d, dict) else set()
                    old = [target_str(rw["target_true"]) for rw in rec.get("requested_rewrite") or []
                           if target_str(rw["target_new"]) in refs][:1]
                out[(rec["case_id"], f"hop_wise_pred[{h}][{s}]")] = old
        for k, _ in enumerate(post.get("accuracy_pred") or []):
            out[(rec["case_id"], f"accuracy_pred[{k}]")] = old_refs_for(case, None, aliases) if case else []
    return out

"""The strict offline grader: does an answer assert the gold answer as *its* answer? Whole-word alias
matching, then the answer's explicit conclusion, else its first sentence that answers the question,
decides; mentions in negations, questions, options, suppositions and history are not assertions
(docs/grading.md "Rules")."""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

from .files import atomic_write_jsonl

SHORT_ALIAS = 3  # aliases of at most this many letters/digits match case-sensitively ("UK", "IN")


@dataclass
class Grade:
    """One graded answer. `rule` names what decided it and quotes the deciding span."""
    correct: bool
    asserts_old: bool
    rule: str
    asserts_new: bool = False     # the gold answer is stated somewhere (SRR's "asserted the new fact")
    negates_new: bool = False     # ... and negated or withdrawn after that
    self_refutes: bool = False    # stated, then negated or concluded otherwise; not recovered


# ---------------------------------------------------------------------------- text

_WORD = re.compile(r"[^\W_]+")
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "no", "inc", "ltd", "co", "mt", "ft", "gen", "lt"}
_TRANSLIT = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ı": "i", "ß": "ss",
                           "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "\u2019": "'", "\u2018": "'",
                           "\u201c": '"', "\u201d": '"'})
_STOP = set("""a an the of in on at to by for from with and or but is are was were be been being it its this that
these those what which who whom whose where when why how does do did has have had now let lets us think step
question answer s t about as into than then there their they he she his her him them we our you your i me my
not no yes one can could would should will may might also just so if sorry mean actually wait hmm well oh ok
okay sure indeed""".split())


def normalise(text: str) -> str:
    """NFKC, accents and ł/ø/æ... spelled plainly, dotted initials joined ("U.S." is "US"), "n't" read as
    "not", typographic quotes made plain."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text)).translate(_TRANSLIT)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"\b(?:[A-Za-z]\.){2,}", lambda m: m.group().replace(".", ""), text)
    return re.sub(r"(?i)n't\b", " not", text)


@dataclass
class _Tok:
    fold: str    # case-folded
    orig: str    # as written (short aliases match this)
    start: int   # character offsets in the normalised text
    end: int
    sent: int    # sentence index
    line: int    # line index
    clause: int  # clause index: clauses end at , ; : ( ) and before but / however / although / while
    pre: str     # the text between the previous word and this one


_CLAUSE_OPENERS = {"but", "however", "although", "though", "while", "whereas", "yet"}


def tokens(text: str) -> list[_Tok]:
    """Words of normalised text with their sentence, line and clause. Sentences end at a line break or
    at . ! ? followed by a space, except after an initial ("Russell T. Davies") or an abbreviation."""
    out: list[_Tok] = []
    sent = line = clause = last = 0
    for m in _WORD.finditer(text):
        gap = text[last:m.start()]
        word = m.group()
        if out and _ends_sentence(gap, out[-1]):
            sent += 1
            clause += 1
        elif out and (re.search(r"[,;:()\[\]]", gap) or word.casefold() in _CLAUSE_OPENERS):
            clause += 1
        line += gap.count("\n")
        out.append(_Tok(word.casefold(), word, m.start(), m.end(), sent, line, clause, gap))
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


_CORPORATE = re.compile(r"[,\s]+(?:inc|ltd|llc|plc|corp|corporation|co|company|gmbh|s\.?a)\.?$", re.IGNORECASE)


def _with_short_forms(aliases: Iterable[str]) -> list[str]:
    """The aliases, plus each company name without its legal suffix ("Apple Inc." also as "Apple")."""
    out = list(aliases)
    out += [s for s in (_CORPORATE.sub("", a).strip() for a in aliases) if s and s not in out]
    return out


@dataclass
class _Mention:
    first: int   # token index of the first word
    last: int    # token index of the last word
    gold: bool   # a gold alias (else an old one)


def mentions(toks: list[_Tok], refs: Iterable[str], old_refs: Iterable[str], caps_lines: set[int]) -> list[_Mention]:
    """Whole-word occurrences of any gold or old alias, in text order; of overlapping ones the longest
    (the earlier on a tie) is kept. In an all-capitals line a short alias that is also an English word
    ("IN", "US") does not match: there it is the word."""
    found: list[_Mention] = []
    for alias, gold in [(a, True) for a in _with_short_forms(refs)] + [(a, False) for a in _with_short_forms(old_refs)]:
        words, exact = alias_tokens(alias)
        if not words:
            continue
        n = len(words)
        word_like = exact and " ".join(words).casefold() in _STOP
        for i in range(len(toks) - n + 1):
            if all((toks[i + k].orig if exact else toks[i + k].fold) == words[k] for k in range(n)):
                if not (word_like and toks[i].line in caps_lines):
                    found.append(_Mention(i, i + n - 1, gold))
    found.sort(key=lambda m: (m.first, -(m.last - m.first)))
    kept: list[_Mention] = []
    for m in found:
        if not kept or m.first > kept[-1].last:
            kept.append(m)
    return kept


# ---------------------------------------------------------------------------- the answer, read once

_FILLER = {"the", "a", "an", "of", "by", "in", "from", "to", "at", "as", "with", "on", "being", "be"}
_NEG_BEFORE = [("not",), ("no", "longer"), ("never",), ("instead", "of"), ("rather", "than"), ("neither",),
               ("nor",), ("replacing",), ("replaced",), ("formerly",), ("previously",), ("former",),
               ("originally",), ("used", "to", "be"), ("than",), ("outside",), ("except",), ("succeeding",)]
_CLAUSE_NEG = {"not", "never", "neither", "nor"}
_NOT_A_NEGATION = {"only", "just", "merely", "simply"}  # "not only X but also Y"
_HISTORY = {"originally", "formerly", "previously", "initially", "until"}  # anywhere in the mention's clause
_CHANGE = {"moved", "changed", "shifted", "switched", "transferred", "relocated", "went", "move", "shift",
           "transition", "transitioned", "changing", "moving"}
_BE = {"is", "was", "are", "were", "has", "had", "have", "does", "did", "do", "will", "would", "can", "could",
       "should", "may", "might"}
_NEG_WORDS = {"not", "no", "never", "incorrect", "wrong", "outdated", "false", "inaccurate", "mistaken",
              "obsolete", "untrue", "replaced", "succeeded", "superseded", "overturned"}
# A name followed by one of these is part of a longer name ("Elvis Presley Records"), not the entity.
_NAME_PARTS = {"records", "productions", "studios", "studio", "company", "corporation", "inc", "university",
               "airport", "street", "stadium", "foundation", "group", "prize", "award", "awards", "museum",
               "center", "centre", "hall", "park", "square", "station", "club", "orchestra", "society",
               "institute", "agency", "network", "channel", "theatre", "theater", "bridge", "river", "road", "fc"}
# ... and one preceded by one of these: "North Korea" is not "Korea".
_NAME_PREFIXES = {"north", "south", "east", "west", "new", "northern", "southern", "eastern", "western", "upper",
                  "lower", "central", "papua"}
_HYPOTHETICAL = re.compile(
    r"\b(?:let's (?:assume|say|suppose|imagine|think about|consider|look at|start with)|assumption|need to (?:find|identify|determine|figure out|know)|"
    r"want to (?:find|know)|have to find|(?:some|many) (?:people )?(?:claim|say|believe|think)|"
    r"people (?:often |may )?(?:think|believe|say|claim)|it is (?:often |widely )?(?:said|claimed|believed))\b",
    re.IGNORECASE)
_MAYBE = {"could", "might", "may"}  # "could be X": a possibility, when right before the name
_OPTIONS_CUE = re.compile(r"\b(?:options?|choices|possibilities|candidates|possible answers|possible \w+s)\b",
                          re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022]|\(?[A-Ea-e]\)|[A-E]\.|step\s+\d+\s*:?)\s*", re.IGNORECASE)
_OPTION = re.compile(r"^\s*(?:\(?[A-Ea-e]\)|[A-E]\.)\s")
_OLD_LABEL = re.compile(r"^(?:old(?: fact| answer)?|previous(?: answer| fact)?|previously|before|original answer)\s*:$",
                        re.IGNORECASE)
_TAG_LINE = re.compile(r"^\s*</?\s*think\s*>\s*$", re.IGNORECASE)
_WITHDRAW = re.compile(r"^\W*(?:actually|wait|sorry|correction|no,|hmm,? actually)\b|"
                       r"\b(?:that|this) (?:is|was) (?:wrong|incorrect|false|not (?:right|correct|true))\b",
                       re.IGNORECASE)
_AFTER_WINDOW = 4
_CLAUSE_WINDOW = 5


class _Answer:
    """One answer's text, words, sentences, clauses and lines, with the cheap lookups the rules use."""

    def __init__(self, answer: str):
        text = normalise(answer)
        # An answer that concludes and then writes a new "Question:" has started another exchange.
        cut = re.search(r"\n\s*(?:question|q|user|human)\s*:", text, re.IGNORECASE)
        if cut and _STRONG.search(text[:cut.start()]):
            text = text[:cut.start()]
        self.text = text
        self.toks = tokens(text)
        self.lines = text.split("\n")
        self.sentences: dict[int, list[int]] = {}
        for i, t in enumerate(self.toks):
            self.sentences.setdefault(t.sent, []).append(i)
        self.caps_lines = {k for k, ln in enumerate(self.lines) if re.search(r"[A-Z]{2}", ln) and not
                           re.search(r"[a-z]", ln)}
        self.all_mentions: list[_Mention] = []  # set by _Reading: every gold and old mention

    def sentence(self, i: int) -> list[int]:
        return self.sentences[self.toks[i].sent]

    def sentence_text(self, i: int) -> str:
        idx = self.sentence(i)
        return self.text[self.toks[idx[0]].start:self.toks[idx[-1]].end]

    @cached_property
    def heads(self) -> list[tuple | None]:
        return [_list_head(ln) for ln in self.lines]

    @cached_property
    def head_items(self) -> dict[tuple, set[str]]:
        """List-item opening -> the distinct texts of the items that open so."""
        out: dict[tuple, set[str]] = {}
        for ln, h in zip(self.lines, self.heads):
            if h is not None:
                out.setdefault(h, set()).add(" ".join(ln[_LIST_ITEM.match(ln).end():].split()).casefold())
        return out

    def negated(self, m: _Mention) -> bool:
        """A negation cue before the mention in its clause ("not X", "was not created by X", "no longer the
        X", "instead of X", "moved from X", "originally X"), or a negated verb just after it ("X is not",
        "X is incorrect", "X was replaced by")."""
        toks = self.toks
        sent, clause = toks[m.first].sent, toks[m.first].clause
        j, skipped = m.first - 1, 0
        while True:  # cues that end right before the mention, with up to two filler words between
            for cue in _NEG_BEFORE:
                k = j - len(cue) + 1
                if k >= 0 and all(toks[k + i].sent == sent and toks[k + i].fold == cue[i] for i in range(len(cue))):
                    if not (cue == ("replaced",) and j + 1 < m.first and toks[j + 1].fold == "by"):  # replaced by X
                        return True
            if j < 0 or toks[j].sent != sent or toks[j].fold not in _FILLER or skipped == 2:
                break
            j, skipped = j - 1, skipped + 1
        for k in range(m.first - 1, max(-1, m.first - 1 - _CLAUSE_WINDOW), -1):  # "not" earlier in the clause
            if toks[k].clause != clause:
                break
            if toks[k].fold in _CLAUSE_NEG and toks[k + 1].fold not in _NOT_A_NEGATION:
                return True
            if toks[k].fold == "longer" and k > 0 and toks[k - 1].fold == "no":
                return True
        if any(toks[k].fold in _HISTORY for k in self.clause_of(m)) or toks[self.sentence(m.first)[0]].fold in _HISTORY:
            return True
        if m.first > 0 and toks[m.first - 1].fold == "from" and any(
                toks[k].fold in _CHANGE for k in range(max(0, m.first - 4), m.first - 1) if toks[k].sent == sent):
            return True
        after = [t.fold for t in toks[m.last + 1:m.last + 1 + _AFTER_WINDOW] if t.clause == toks[m.last].clause]
        names = {n.first for n in self.all_mentions}
        for i, w in enumerate(after):
            if w in _BE and i + 1 < len(after) and after[i + 1] in _NEG_WORDS and (
                    i + 2 >= len(after) or after[i + 1] != "not" or after[i + 2] not in _NOT_A_NEGATION):
                if after[i + 1] != "not" or not any(m.last + i + j in names for j in (3, 4)):
                    return True  # (but in "X is not Y", X is only set against Y)
            if w in ("incorrect", "wrong", "outdated"):
                return True
        return self.under_old_label(m)

    def under_old_label(self, m: _Mention) -> bool:
        """The nearest "Label:" before the mention on its line is an old-fact label ("Old fact: X")."""
        t = self.toks[m.first]
        line_start = max(self.text.rfind("\n", 0, t.start) + 1, t.start - 160)
        before = self.text[line_start:t.start]
        if ":" not in before:
            return False
        labels = list(re.finditer(r"(?:^|[\s*#>\-])([A-Za-z][A-Za-z ]{0,24}?)\s*\**\s*:", before))
        return bool(labels) and bool(_OLD_LABEL.match(labels[-1].group(1) + ":"))

    @cached_property
    def clauses(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, t in enumerate(self.toks):
            out.setdefault(t.clause, []).append(i)
        return out

    def clause_of(self, m: _Mention) -> list[int]:
        return self.clauses[self.toks[m.first].clause]

    def withdrawn(self, m: _Mention) -> bool:
        """The answer takes it back: "..., but that is false", or a next sentence opening "Actually," /
        "Wait, no" / "Sorry, I mean" / "That is wrong"."""
        idx = self.sentence(m.first)
        rest = self.text[self.toks[m.last].end:self.toks[idx[-1]].end]
        if re.search(r"\bbut (?:that|this) (?:is|was) (?:wrong|incorrect|false|not true)\b", rest, re.IGNORECASE):
            return True
        nxt = idx[-1] + 1
        if nxt >= len(self.toks):
            return False
        return bool(_WITHDRAW.search(self.sentence_text(nxt)[:60]))

    def modifier(self, m: _Mention) -> bool:
        """The name modifies something else: a possessive ("Tokyo's sister city"), a longer name ("Elvis
        Presley Records", "North Korea"), or a heading ("- Madonna:" above what the answer says of her)."""
        toks, text = self.toks, self.text
        end = toks[m.last].end
        if text[end:end + 2] in ("'s", "' "):
            return True
        line_end = text.find("\n", end)
        if re.fullmatch(r"[\s*_]*:[\s*_]*", text[end:line_end if line_end >= 0 else len(text)]):
            return True
        nxt = toks[m.last + 1] if m.last + 1 < len(toks) else None
        if nxt is not None and nxt.sent == toks[m.last].sent and nxt.fold in _NAME_PARTS and nxt.orig[0].isupper():
            return True
        prv = toks[m.first - 1] if m.first > 0 else None
        return (prv is not None and prv.sent == toks[m.first].sent and prv.fold in _NAME_PREFIXES
                and prv.orig[0].isupper() and not prv.pre.strip())

    def alternative(self, m: _Mention) -> bool:
        """One option of a choice the answer does not make: "X or Y", "either X", an item of an
        enumeration, a sentence that lists options, a lettered option ("B) X", "(A) X (B) Y"), a column of
        short lines, or an item of a list whose items open alike and differ ("1. The capital is X /
        2. The capital is Y")."""
        toks = self.toks
        sent = toks[m.first].sent
        before = toks[m.first - 1].fold if m.first > 0 and toks[m.first - 1].sent == sent else ""
        after = toks[m.last + 1].fold if m.last + 1 < len(toks) and toks[m.last + 1].sent == sent else ""
        if before in ("or", "either", "versus", "vs") or after in ("or", "versus", "vs") or self.in_series(m):
            return True
        if _OPTIONS_CUE.search(self.sentence_text(m.first)):
            return True
        k = toks[m.first].line
        if _OPTION.match(self.lines[k]) or self.in_column(k):
            return True
        if re.search(r"\(\s*[A-Ea-e]\s*\)\s*$", self.text[max(0, toks[m.first].start - 8):toks[m.first].start]):
            return True  # an inline option: "(A) X (B) Y"
        head = self.heads[k]
        return head is not None and len(self.head_items[head]) > 1

    def in_series(self, m: _Mention) -> bool:
        """An item of an inline enumeration that ends in "and/or ...": ", X, Y and Z", "such as X, Y"."""
        toks = self.toks
        sent = toks[m.first].sent
        nxt = toks[m.last + 1] if m.last + 1 < len(toks) and toks[m.last + 1].sent == sent else None
        comma_after = nxt is not None and "," in nxt.pre
        and_after = nxt is not None and nxt.fold in ("and", "or") and "," not in nxt.pre
        comma_before = m.first > 0 and "," in toks[m.first].pre
        k = m.first
        introduced = k >= 1 and (toks[k - 1].fold in ("including", "like") or
                                 (k >= 2 and (toks[k - 2].fold, toks[k - 1].fold) == ("such", "as")))
        if not ((comma_before and (comma_after or and_after)) or (introduced and comma_after)):
            return False
        ahead = [t.fold for t in toks[m.last + 1:m.last + 13] if t.sent == sent]
        return "and" in ahead or "or" in ahead or introduced

    def in_column(self, k: int) -> bool:
        return k in self.column_lines

    @cached_property
    def column_lines(self, width: int = 4, rows: int = 3) -> set[int]:
        """Lines that belong to a run of at least `rows` consecutive, not all equal lines of at most `width`
        words: a column of names (a line with a colon or a <think> tag is not part of one)."""
        def short(ln: str) -> bool:
            return not _TAG_LINE.match(ln) and ":" not in ln and 0 < len(_WORD.findall(ln)) <= width
        out: set[int] = set()
        run: list[int] = []
        for j, ln in enumerate(self.lines + [""]):
            if j < len(self.lines) and short(ln):
                run.append(j)
                continue
            if len(run) >= rows and len({" ".join(self.lines[i].split()).casefold() for i in run}) > 1:
                out.update(run)
            run = []
        return out

    def in_question(self, m: _Mention) -> bool:
        """The mention's sentence ends with a question mark."""
        last = self.sentence(m.first)[-1]
        stop = self.toks[last + 1].start if last + 1 < len(self.toks) else len(self.text)
        return "?" in self.text[self.toks[last].end:stop]

    def hypothetical(self, m: _Mention) -> bool:
        """A supposition, a plan or reported belief, not a claim: its sentence opens "If ..." or its clause
        so far says "we need to find", "some claim", "let's assume"; or "could/might/may be X"."""
        toks = self.toks
        idx = self.sentence(m.first)
        opener = re.match(r"^\W*(?:if|suppose|supposing|imagine|assume|assuming|hypothetically)\b",
                          self.sentence_text(m.first), re.IGNORECASE)
        if opener and toks[m.first].clause == toks[idx[0]].clause:  # inside the if-clause itself
            return True
        start = next(i for i in idx if toks[i].clause >= toks[m.first].clause - 1)
        if _HYPOTHETICAL.search(self.text[toks[start].start:toks[m.first].start]):
            return True
        return m.first >= 2 and toks[m.first - 1].fold == "be" and toks[m.first - 2].fold in _MAYBE

    def concessive(self, m: _Mention) -> bool:
        """The mention's clause opens with "while", "although", "though", "whereas"."""
        first = self.clause_of(m)[0]
        return self.toks[first].fold in ("while", "although", "though", "whereas")

    def asserted(self, m: _Mention, negated: bool) -> bool:
        return not (negated or self.modifier(m) or self.alternative(m) or self.in_question(m)
                    or self.hypothetical(m) or self.concessive(m))


def _list_head(line: str) -> tuple[str, ...] | None:
    """The first three words of a list item (None for a line that is not one)."""
    marker = _LIST_ITEM.match(line)
    if not marker or marker.end() == 0:
        return None
    words = tuple(w.casefold() for w in _WORD.findall(line[marker.end():])[:3])
    return words if len(words) == 3 else None


# ---------------------------------------------------------------------------- deciding

# Conclusions, latest first: an answer statement ("the answer is X", "Answer: X") decides whether or not
# it names an answer; failing one, a summary ("In conclusion, X") decides the same way; a weak one ("So,
# X", "Updated fact: X") decides only when it names the gold or the old answer.
_STRONG = re.compile(
    r"\b(?:the|my|our)\s+(?:final\s+|correct\s+|right\s+|updated\s+|new\s+)?answer\s+"
    r"(?:to\s+(?:this|the|your)\s+question\s+)?(?:now\s+)?"
    r"(?:is|would\s+be|will\s+be|should\s+be)\b\s*:?|(?:^|\n)[\s*#>]*(?:the\s+)?(?:final\s+)?answer\s*\**\s*"
    r"(?:[:\u2014\u2013]|-\s|\n)|\bfinal\s+answer\s*\**\s*[:\u2014\u2013]", re.IGNORECASE)
_SUMMARY = re.compile(r"\b(?:in\s+conclusion|to\s+conclude|in\s+summary|to\s+summari[sz]e)\b\s*[,:]?|"
                      r"(?:^|\n)[\s*#>]*conclusion\s*\**\s*:", re.IGNORECASE)
_WEAK = re.compile(r"(?:^|(?<=[.!?:\n]))[\s*#>\-]*(?:so|therefore|thus|hence|overall|as\s+a\s+result|"
                   r"(?:updated|new)\s+(?:fact|answer)\s*\**\s*:)(?![\w])\s*,?", re.IGNORECASE)
# The probes' fixed wording (eval/probes.py), which says nothing about the relation asked.
_BOILERPLATE = re.compile(r"^\s*now,\s*|\s*why\?|let's think step by step\.?|tell me about .*? first, and then "
                          r"answer\.?|answer first, and then tell me about .*?\.?$", re.IGNORECASE | re.MULTILINE)
_SHORT_ANSWER = 12  # a sentence of at most this many words that names the question's subject answers it
_BARE = 1           # a bare answer: at most this many content words besides the names ("X (1982)", "X, not Y")


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


class _Reading:
    """The mentions of one answer, which are asserted, and the question's relation and subject."""

    def __init__(self, question: str, answer: str, refs: list[str], old_refs: list[str]):
        self.a = _Answer(answer)
        self.found = mentions(self.a.toks, refs, old_refs, self.a.caps_lines)
        self.a.all_mentions = self.found
        self.negated = {m.first: self.a.negated(m) for m in self.found}
        self.asserted = [m for m in self.found if self.a.asserted(m, self.negated[m.first])]
        self.by_first = {m.first: m for m in self.asserted}
        self.relation = _relation_words(question)
        self.subject = _subject_words(question, [*refs, *old_refs])
        self._named = {i for n in self.found for i in range(n.first, n.last + 1)}
        self._content: dict[int, list[str]] = {}
        self._stems: dict[int, set[str]] = {}
        # after[k]: the first index of found[] from which on a gold (True) / old (False) mention is negated
        self._negated_from = {g: [False] * (len(self.found) + 1) for g in (True, False)}
        for k in range(len(self.found) - 1, -1, -1):
            n = self.found[k]
            for g in (True, False):
                self._negated_from[g][k] = self._negated_from[g][k + 1] or (n.gold == g and self.negated[n.first])
        self._index = {n.first: k for k, n in enumerate(self.found)}

    def named(self, span: list[int]) -> _Mention | None:
        return next((self.by_first[i] for i in span if i in self.by_first), None)

    def later_negated(self, m: _Mention) -> bool:
        """A mention of the same answer after `m` is negated, or `m` is withdrawn."""
        return self._negated_from[m.gold][self._index[m.first] + 1] or self.a.withdrawn(m)

    def content_besides(self, m: _Mention) -> list[str]:
        """The sentence's content words other than the names of either answer and numbers."""
        sent = self.a.toks[m.first].sent
        if sent not in self._content:
            toks = self.a.toks
            self._content[sent] = [toks[i].fold for i in self.a.sentence(m.first) if i not in self._named
                                   and toks[i].fold not in _STOP and not toks[i].fold.isdigit()]
        return self._content[sent]

    def content_stems(self, m: _Mention) -> set[str]:
        sent = self.a.toks[m.first].sent
        if sent not in self._stems:
            self._stems[sent] = {_stem(w) for w in self.content_besides(m)}
        return self._stems[sent]

    def answers_question(self, m: _Mention) -> bool:
        """A bare answer, a short sentence that names the question's relation or subject, or a longer one
        that names its relation."""
        besides = self.content_besides(m)
        if len(besides) <= _BARE:
            return True
        words = self.content_stems(m)
        if len(self.a.sentence(m.first)) <= _SHORT_ANSWER and words & self.subject:
            return True
        return bool(words & self.relation)

    def states_fact(self, m: _Mention) -> bool:
        """Stricter than answering: a bare answer, or a sentence naming the relation and the subject."""
        if len(self.content_besides(m)) <= _BARE:
            return True
        words = self.content_stems(m)
        return bool(words & self.relation) and (not self.subject or bool(words & self.subject))

    def span(self, pos: int) -> list[int]:
        """Token indices from character `pos` to the end of the sentence of the first word after it (so a
        conclusion ending in a colon or a line break reads the next sentence); a span that only negates
        ("The answer is not X.") reads on into the next sentence."""
        toks = self.a.toks
        first = next((i for i, t in enumerate(toks) if t.start >= pos), None)
        if first is None:
            return []
        idx = [i for i in self.a.sentence(first) if i >= first]
        only_negated = self.named(idx) is None and any(m.first in idx and self.negated[m.first] for m in self.found)
        if only_negated and idx[-1] + 1 < len(toks):
            idx += self.a.sentence(idx[-1] + 1)
        return idx

    def quote(self, idx: list[int], start: int | None = None) -> str:
        text, toks = self.a.text, self.a.toks
        if not idx:
            return text[start:].strip()[:100] if start is not None else ""
        a = toks[idx[0]].start if start is None else start
        s = " ".join(text[a:toks[idx[-1]].end].split())
        return s if len(s) <= 100 else s[:97] + "..."

    def names_nothing(self, idx: list[int]) -> bool:
        """A conclusion span without any name or number ("the answer is the updated creator")."""
        return len(idx) <= 5 and not any(self.a.toks[i].orig[0].isupper() or self.a.toks[i].orig.isdigit()
                                         for i in idx)


def grade(question: str, answer: str, refs: Iterable[str], old_refs: Iterable[str] = ()) -> Grade:
    """Grade one answer (docs/grading.md "Rules"); the numbered steps are the decision order."""
    r = _Reading(question, answer, [x for x in refs if x.strip()], [x for x in old_refs if x.strip()])
    text = r.a.text
    # 1) the last answer statement that names something decides ("the answer is X", "Answer: X")
    for c in reversed(list(_STRONG.finditer(text))):
        span = r.span(c.end())
        if not r.names_nothing(span) or r.named(span) is not None:
            return _finish(r, r.named(span), f"conclusion: {r.quote(span, c.start())!r}", True)
    # 2) else the last summary ("In conclusion, X", "In summary, X")
    summary = list(_SUMMARY.finditer(text))
    if summary:
        span = r.span(summary[-1].end())
        return _finish(r, r.named(span), f"conclusion: {r.quote(span, summary[-1].start())!r}", True)
    # 3) else the last weak conclusion ("So, X", "Therefore X", "Updated fact: X") that names an answer
    for w in reversed(list(_WEAK.finditer(text))):
        span = r.span(w.end())
        if r.named(span) is not None:
            return _finish(r, r.named(span), f"conclusion: {r.quote(span, w.start())!r}", True)
    # 4) else the first sentence that answers the question and asserts the gold or the old answer,
    #    unless the answer later withdraws it ("... X is not the creator", "Actually, that is wrong")
    for m in r.asserted:
        if r.answers_question(m) and not r.later_negated(m):
            return _finish(r, m, f"first answer: {r.quote(r.a.sentence(m.first))!r}", False)
    # 5) else the answer asserts neither
    return _finish(r, None, "no answer asserted", False)


def _finish(r: _Reading, hit: _Mention | None, rule: str, concluded: bool) -> Grade:
    """The verdict, and for SRR: whether the new answer is stated (asserted in a bare answer, or in a
    sentence naming the question's subject and relation), negated or withdrawn after that, and whether the
    answer then refutes itself: it negates the new answer or explicitly concludes with the old one, and
    does not end on the new one."""
    correct = hit is not None and hit.gold
    old = hit is not None and not hit.gold
    stated = next((m for m in r.asserted if m.gold and r.states_fact(m)), None)
    negates = stated is not None and r.later_negated(stated)
    concludes_old = old and concluded and stated is not None and hit.first > stated.last
    side = " (gold)" if correct else " (old)" if old else ""
    return Grade(correct, old, rule + side, asserts_new=stated is not None, negates_new=negates,
                 self_refutes=stated is not None and not correct and (negates or concludes_old))


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

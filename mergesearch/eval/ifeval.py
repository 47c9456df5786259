"""Verifiable instruction-following checks in the style of IFEval (Zhou et al., 2023).

A subset of IFEval's instructions, under IFEval's ids and kwarg names, scored the way the
IFEval task of lm-evaluation-harness scores them:

- strict: the instruction's check on the response as it is; an empty or blank response
  never follows anything.
- loose: the instruction is followed when the strict check passes on any of eight variants
  of the response: as is, without its first line, without its last line, without both, and
  each of these four with every ``*`` removed (variants are stripped after cutting lines).

Relations are IFEval's: ``"less than"`` means count < N and ``"at least"`` means count >= N.
Keywords, forbidden words, the frequency keyword, section splitters and custom postscript
markers are regular expressions matched case-insensitively, exactly as in IFEval.

Where this module differs from IFEval, and why:

- Language detection is not done (it needs ``langdetect``). ``language:response_language``
  is not offered, and ``change_case:english_capital`` / ``english_lowercase`` check only
  ``str.isupper()`` / ``str.islower()`` of the response: IFEval also requires langdetect to
  call the response English, so all-caps text in another language passes here and fails there.
- Sentences (``length_constraints:number_sentences``) and words for
  ``change_case:capital_word_frequency`` come from nltk in IFEval: the Punkt sentence splitter
  with its English model, then nltk's Treebank-style word tokenizer. Both are re-implemented
  here without nltk, following nltk 3.10: the word tokenizer and Punkt's algorithm rule for
  rule, with the English model's abbreviations, collocations and frequent sentence starters.
  Punkt's orthographic table (whether each of ~20,000 words was seen capitalised or in lower
  case, and where in a sentence) is kept only for single letters and ~220 frequent English
  words; any other word counts as never seen. That changes a decision only after an
  abbreviation, an ellipsis, an initial or a numbered item followed by a word outside that
  list: Punkt may start a new sentence there when its table knows the word as a lower-case
  one (``"Wait... Programming is fun."`` is two sentences to Punkt, one here). On ~11,000
  paragraphs of English prose 4 were split differently; with the full table swapped in the
  port agrees with nltk everywhere tested.
- Words for ``length_constraints:number_words`` are runs of ``\\w``, which is exactly what
  IFEval's nltk ``RegexpTokenizer(r"\\w+")`` yields.
- Thresholds must be integers >= 1. IFEval treats 0, a negative or a missing value as unset
  and draws a random one; here that is a ConfigError, as is any other kwarg IFEval would
  replace by a random choice (an empty keyword list, a letter that is not a-z).
- ``combination:repeat_prompt`` falls back to the ``prompt`` argument when ``prompt_to_repeat``
  is not given (IFEval requires the kwarg).
- ``detectable_format:number_highlighted_sections`` counts ``*x*`` and ``**x**`` as
  lm-evaluation-harness does (the original IFEval counted only ``*x*``).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from mergesearch.errors import ConfigError, UnknownNameError, suggest, unknown

__all__ = [
    "INSTRUCTIONS",
    "RELATIONS",
    "InstructionSpec",
    "KwargSpec",
    "check",
    "count_sentences",
    "count_words",
    "follows",
    "loose_variants",
    "split_sentences",
    "validate",
    "word_tokenize",
]

LESS_THAN = "less than"
AT_LEAST = "at least"
RELATIONS = (LESS_THAN, AT_LEAST)

CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

_UNSUPPORTED = {
    "language:response_language": "it needs language detection (langdetect)",
    "length_constraints:nth_paragraph_first_word": "it is outside the supported subset",
}


# ---------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs, IFEval's word count."""
    return len(_WORD.findall(text))


# ---------------------------------------------------------------------------------------------
# Sentences: Punkt (Kiss & Strunk, 2006) with the parameters of nltk's English model
# ---------------------------------------------------------------------------------------------

_PUNKT_ABBREVIATIONS = frozenset(
    """
    a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b c.v
    calif chg cie co col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j
    feb fla fri ft g g.d g.f g.k ga gen h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan
    jr k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj messrs mg mich minn mr mrs ms n n.c
    n.d n.h n.j n.m n.v n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r r.a r.h r.i r.j
    r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k u.n
    u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
    """.split()
) | {". . "}

_PUNKT_SENT_STARTERS = frozenset(
    """
    according although among both but despite even he however i if in indeed instead it many
    meanwhile moreover most nevertheless nonetheless nor sales separately similarly since so
    some the there these they this though thus under when while yet
    """.split()
)

_PUNKT_COLLOCATIONS = frozenset(
    tuple(pair.split())
    for pair in """
    ##number## abreast, ##number## aes, ##number## business, ##number## cbot, ##number## colgate,
    ##number## commodities, ##number## cooper, ##number## corrections, ##number## credit,
    ##number## dividend, ##number## financing, ##number## genentech, ##number## henley,
    ##number## insider, ##number## international, ##number## leisure, ##number## letters,
    ##number## notable, ##number## pay-fone, ##number## pegasus, ##number## pepper,
    ##number## review, ##number## rj, ##number## wedgestone, ##number## who, ##number## zimmer,
    b edelman, b levine, b smith, b stewart, b wigton, i magnin, i toussie, j aron, j fialka,
    j walter, o ludcke
    """.split(",")
)

_ORTHO_BEG_UC, _ORTHO_MID_UC, _ORTHO_UNK_UC = 1 << 1, 1 << 2, 1 << 3
_ORTHO_BEG_LC, _ORTHO_MID_LC, _ORTHO_UNK_LC = 1 << 4, 1 << 5, 1 << 6
_ORTHO_UC = _ORTHO_BEG_UC | _ORTHO_MID_UC | _ORTHO_UNK_UC
_ORTHO_LC = _ORTHO_BEG_LC | _ORTHO_MID_LC | _ORTHO_UNK_LC

# Punkt's orthographic flags for the words kept from the English model's table.
_ORTHO_BY_FLAGS = {
    2: "whoever additionally consequently",
    4: "hi k l m v y",
    8: "p",
    12: "f o t u x",
    14: "i j oh",
    32: "them think imagine please check always okay thanks thank",
    34: "her us which either neither such yet unless therefore hence furthermore otherwise"
    " finally overall remember consider ask yes sometimes within between someone anyone"
    " tomorrow seven eight ten nevertheless nonetheless",
    36: "c s been must use keep add get go come start write find hey everything something",
    38: "you me my our their where why whatever few until third am do did see look never only"
    " well sure good people nobody nine again actually really maybe",
    40: "nothing",
    42: "your nor though whether thus moreover still try through indeed besides regardless"
    " similarly",
    44: "b d give read around time",
    46: "he she we they his its these those there what how an any each all both many most"
    " several although while if once however meanwhile now first second let stop not often"
    " just even great about against among life everyone today one four perhaps despite",
    96: "him into",
    98: "does without",
    100: "z than have might",
    102: "every much or would should take five six",
    106: "here so instead were note yesterday",
    108: "who was be has had could make",
    110: "it this when some no more other another for because since after before as also next"
    " last is are will may in on at with from over under during two three",
    116: "can",
    126: "that the a and but then by to of",
}
_PUNKT_ORTHO = {word: flags for flags, words in _ORTHO_BY_FLAGS.items() for word in words.split()}

_NON_WORD = r"(?:[)\";}\]\*:@\'\({\[\u2018\u2019\u201c\u201d\xab\xbb?!])"
_MULTI_CHAR = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_WORD_START = r"[^\(\"\`{\[:;&\#\*@\)}\]\-,]"
_PUNKT_WORD = re.compile(
    rf"""
    {_MULTI_CHAR}
    | (?={_WORD_START})\S+?
      (?=\s|$|{_NON_WORD}|{_MULTI_CHAR}|,(?=$|\s|{_NON_WORD}|{_MULTI_CHAR}))
    | \S
    """,
    re.VERBOSE,
)
_PERIOD_CONTEXT = re.compile(
    rf"""
    [.?!]
    (?=(?P<after_tok>{_NON_WORD}|\s+(?P<next_tok>\S+)))
    """,
    re.VERBOSE,
)
_REALIGN = re.compile(r'["\')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)', re.MULTILINE)
_NUMERIC = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_ELLIPSIS = re.compile(r"\.\.+$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_NOT_SENT_STARTS = frozenset(";:,.!?")


class _Token:
    __slots__ = ("tok", "type", "sentbreak", "abbr", "ellipsis")

    def __init__(self, tok: str):
        self.tok = tok
        self.type = _NUMERIC.sub("##number##", tok.lower())
        self.sentbreak = False
        self.abbr = False
        self.ellipsis = False

    @property
    def type_no_period(self) -> str:
        return self.type[:-1] if len(self.type) > 1 and self.type[-1] == "." else self.type

    @property
    def type_no_sentperiod(self) -> str:
        return self.type_no_period if self.sentbreak else self.type


def _ortho_says_starts(token: _Token) -> bool | None:
    """Punkt's orthographic heuristic: True/False, or None when it cannot tell."""
    if token.tok in _NOT_SENT_STARTS:
        return False
    flags = _PUNKT_ORTHO.get(token.type_no_sentperiod, 0)
    if token.tok[0].isupper() and flags & _ORTHO_LC and not flags & _ORTHO_MID_UC:
        return True
    if token.tok[0].islower() and (flags & _ORTHO_UC or not flags & _ORTHO_BEG_LC):
        return False
    return None


def _annotate(tokens: list[_Token]) -> None:
    for token in tokens:
        tok = token.tok
        if tok in (".", "?", "!"):
            token.sentbreak = True
        elif _ELLIPSIS.match(tok):
            token.ellipsis = True
        elif tok.endswith(".") and not tok.endswith(".."):
            stem = tok[:-1].lower()
            if stem in _PUNKT_ABBREVIATIONS or stem.split("-")[-1] in _PUNKT_ABBREVIATIONS:
                token.abbr = True
            else:
                token.sentbreak = True
    for token, nxt in itertools.pairwise(tokens):
        if not token.tok.endswith("."):
            continue
        typ, next_typ = token.type_no_period, nxt.type_no_sentperiod
        initial = bool(_INITIAL.match(token.tok))
        if (typ, next_typ) in _PUNKT_COLLOCATIONS:
            token.sentbreak, token.abbr = False, True
            continue
        if (token.abbr or token.ellipsis) and not initial:
            starts = _ortho_says_starts(nxt)
            if starts is True:
                token.sentbreak = True
                continue
            if nxt.tok[0].isupper() and next_typ in _PUNKT_SENT_STARTERS:
                token.sentbreak = True
                continue
        if initial or typ == "##number##":
            starts = _ortho_says_starts(nxt)
            if starts is False:
                token.sentbreak, token.abbr = False, True
            elif (
                starts is None
                and initial
                and nxt.tok[0].isupper()
                and not _PUNKT_ORTHO.get(next_typ, 0) & _ORTHO_LC
            ):
                token.sentbreak, token.abbr = False, True


def _has_inner_sentbreak(context: str) -> bool:
    tokens = [
        _Token(match.group())
        for line in context.split("\n")
        if line.strip()
        for match in _PUNKT_WORD.finditer(line)
    ]
    _annotate(tokens)
    return any(token.sentbreak for token in tokens[:-1])


def _last_whitespace(text: str) -> int:
    for i in range(len(text) - 1, -1, -1):
        if text[i] in string.whitespace:
            return i
    return 0


def _end_contexts(text: str) -> Iterator[tuple[re.Match[str], str]]:
    """Candidate sentence ends, each with the word before it and the token after it."""
    word_start = word_stop = 0
    pending: re.Match[str] | None = None
    for match in _PERIOD_CONTEXT.finditer(text):
        space = _last_whitespace(text[word_stop : match.start()])
        start = space + word_stop + 1 if space else word_start
        if pending and word_stop <= start:
            yield pending, text[word_start:word_stop] + pending.group() + pending["after_tok"]
        pending, word_start, word_stop = match, start, match.start()
    if pending:
        yield pending, text[word_start:word_stop] + pending.group() + pending["after_tok"]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` as nltk's English Punkt model finds them (see module notes)."""
    spans = []
    last = 0
    for match, context in _end_contexts(text):
        if _has_inner_sentbreak(context):
            spans.append((last, match.end()))
            last = match.start("next_tok") if match["next_tok"] else match.end()
    spans.append((last, len(text.rstrip())))

    sentences = []
    shift = 0
    for i, (start, stop) in enumerate(spans):
        start += shift
        if i + 1 == len(spans):
            if text[start:stop]:
                sentences.append(text[start:stop])
            continue
        following = spans[i + 1]
        moved = _REALIGN.match(text[following[0] : following[1]])
        if moved:
            sentences.append(text[start : following[0] + len(moved.group().rstrip())])
            shift = moved.end()
        else:
            shift = 0
            if text[start:stop]:
                sentences.append(text[start:stop])
    return sentences


def count_sentences(text: str) -> int:
    """IFEval's sentence count: the number of Punkt sentences."""
    return len(split_sentences(text))


# ---------------------------------------------------------------------------------------------
# Word tokens: nltk's improved Treebank tokenizer, applied sentence by sentence
# ---------------------------------------------------------------------------------------------

_TREEBANK_STEPS = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_TREEBANK_PADDED_STEPS = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    *(
        (re.compile(pattern), r" \1 \2 ")
        for pattern in (
            r"(?i)\b(can)(?#X)(not)\b",
            r"(?i)\b(d)(?#X)('ye)\b",
            r"(?i)\b(gim)(?#X)(me)\b",
            r"(?i)\b(gon)(?#X)(na)\b",
            r"(?i)\b(got)(?#X)(ta)\b",
            r"(?i)\b(lem)(?#X)(me)\b",
            r"(?i)\b(more)(?#X)('n)\b",
            r"(?i)\b(wan)(?#X)(na)(?=\s)",
            r"(?i) ('t)(?#X)(is)\b",
            r"(?i) ('t)(?#X)(was)\b",
        )
    ),
]


def _treebank(sentence: str) -> list[str]:
    for pattern, replacement in _TREEBANK_STEPS:
        sentence = pattern.sub(replacement, sentence)
    sentence = f" {sentence} "
    for pattern, replacement in _TREEBANK_PADDED_STEPS:
        sentence = pattern.sub(replacement, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """The tokens of nltk's ``word_tokenize`` (Punkt sentences, then Treebank rules)."""
    return [token for sentence in split_sentences(text) for token in _treebank(sentence)]


# ---------------------------------------------------------------------------------------------
# Checks: (response, normalised kwargs) -> bool
# ---------------------------------------------------------------------------------------------


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == LESS_THAN else count >= threshold


def _english_capital(response: str, kw: Mapping[str, Any]) -> bool:
    return response.isupper()


def _english_lowercase(response: str, kw: Mapping[str, Any]) -> bool:
    return response.islower()


def _capital_word_frequency(response: str, kw: Mapping[str, Any]) -> bool:
    capitals = sum(1 for token in word_tokenize(response) if token.isupper())
    return _compare(capitals, kw["capital_relation"], kw["capital_frequency"])


def _json_format(response: str, kw: Mapping[str, Any]) -> bool:
    body = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _number_bullet_lists(response: str, kw: Mapping[str, Any]) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _title(response: str, kw: Mapping[str, Any]) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def _number_highlighted_sections(response: str, kw: Mapping[str, Any]) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [
        h
        for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
        if h.removeprefix("**").removesuffix("**").strip()
    ]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(response: str, kw: Mapping[str, Any]) -> bool:
    parts = re.split(r"\s?" + kw["section_spliter"] + r"\s?\d+\s?", response)
    return len(parts) - 1 >= kw["num_sections"]


def _constrained_response(response: str, kw: Mapping[str, Any]) -> bool:
    body = response.strip()
    return any(option in body for option in CONSTRAINED_RESPONSES)


def _number_words(response: str, kw: Mapping[str, Any]) -> bool:
    return _compare(count_words(response), kw["relation"], kw["num_words"])


def _number_sentences(response: str, kw: Mapping[str, Any]) -> bool:
    return _compare(count_sentences(response), kw["relation"], kw["num_sentences"])


def _number_paragraphs(response: str, kw: Mapping[str, Any]) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == kw["num_paragraphs"]


def _existence(response: str, kw: Mapping[str, Any]) -> bool:
    return all(re.search(k, response, flags=re.IGNORECASE) for k in kw["keywords"])


def _forbidden_words(response: str, kw: Mapping[str, Any]) -> bool:
    return not any(
        re.search(r"\b" + w + r"\b", response, flags=re.IGNORECASE) for w in kw["forbidden_words"]
    )


def _frequency(response: str, kw: Mapping[str, Any]) -> bool:
    count = len(re.findall(kw["keyword"], response, flags=re.IGNORECASE))
    return _compare(count, kw["relation"], kw["frequency"])


def _letter_frequency(response: str, kw: Mapping[str, Any]) -> bool:
    count = collections.Counter(response.lower())[kw["letter"]]
    return _compare(count, kw["let_relation"], kw["let_frequency"])


def _no_comma(response: str, kw: Mapping[str, Any]) -> bool:
    return "," not in response


def _end_checker(response: str, kw: Mapping[str, Any]) -> bool:
    return response.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(response: str, kw: Mapping[str, Any]) -> bool:
    body = response.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


def _number_placeholders(response: str, kw: Mapping[str, Any]) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= kw["num_placeholders"]


def _postscript_pattern(marker: str) -> str:
    if marker == "P.P.S":
        return r"\s*p\.\s?p\.\s?s.*$"
    if marker == "P.S.":
        return r"\s*p\.\s?s\..*$"
    return r"\s*" + marker.lower() + r".*$"


def _postscript(response: str, kw: Mapping[str, Any]) -> bool:
    pattern = _postscript_pattern(kw["postscript_marker"])
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def _repeat_prompt(response: str, kw: Mapping[str, Any]) -> bool:
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _two_responses(response: str, kw: Mapping[str, Any]) -> bool:
    answers = []
    parts = response.split("******")
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif i not in (0, len(parts) - 1):
            return False
    return len(answers) == 2 and answers[0] != answers[1]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

Checker = Callable[[str, Mapping[str, Any]], bool]


@dataclass(frozen=True)
class KwargSpec:
    """One kwarg of an instruction: `type` is ``int`` (>= 1), ``str`` (non-empty) or
    ``list[str]`` (non-empty, of non-empty strings); `choices` limits the allowed values."""

    name: str
    type: Any
    help: str
    required: bool = True
    choices: tuple[str, ...] | None = None
    regex: Callable[[str], str] | None = None


@dataclass(frozen=True)
class InstructionSpec:
    """One supported IFEval instruction: its id, what it asks, its kwargs and its checker."""

    id: str
    help: str
    kwargs: Mapping[str, KwargSpec]
    checker: Checker


def _relation(name: str = "relation") -> KwargSpec:
    return KwargSpec(
        name, str, "'less than' (count < N) or 'at least' (count >= N)", choices=RELATIONS
    )


def _count(name: str, what: str) -> KwargSpec:
    return KwargSpec(name, int, what)


def _spec(id_: str, help_: str, checker: Checker, *kwargs: KwargSpec) -> InstructionSpec:
    return InstructionSpec(id_, help_, MappingProxyType({k.name: k for k in kwargs}), checker)


_SPECS = [
    _spec(
        "change_case:english_capital",
        "The entire response is in capital letters (str.isupper; no language check).",
        _english_capital,
    ),
    _spec(
        "change_case:english_lowercase",
        "The entire response is in lower-case letters (str.islower; no language check).",
        _english_lowercase,
    ),
    _spec(
        "change_case:capital_word_frequency",
        "Words in all capital letters appear 'less than' / 'at least' N times.",
        _capital_word_frequency,
        _count("capital_frequency", "N, the number of all-capital words"),
        _relation("capital_relation"),
    ),
    _spec(
        "detectable_format:json_format",
        "The entire response is JSON, optionally fenced in ```json ... ```.",
        _json_format,
    ),
    _spec(
        "detectable_format:number_bullet_lists",
        "Exactly N markdown bullet points ('* ' or '- ' lines).",
        _number_bullet_lists,
        _count("num_bullets", "N, the exact number of bullet points"),
    ),
    _spec(
        "detectable_format:title",
        "A title wrapped in double angular brackets, such as <<poem of joy>>.",
        _title,
    ),
    _spec(
        "detectable_format:number_highlighted_sections",
        "At least N sections highlighted with markdown, *like this* or **like this**.",
        _number_highlighted_sections,
        _count("num_highlights", "N, the minimum number of highlighted sections"),
    ),
    _spec(
        "detectable_format:multiple_sections",
        "At least N sections, each starting with '<section_spliter> <number>'.",
        _multiple_sections,
        KwargSpec(
            "section_spliter",
            str,
            "the word that starts a section, such as 'Section' or 'SECTION' (a regex)",
            regex=lambda s: r"\s?" + s + r"\s?\d+\s?",
        ),
        _count("num_sections", "N, the minimum number of sections"),
    ),
    _spec(
        "detectable_format:constrained_response",
        "The response contains 'My answer is yes.', 'My answer is no.' or 'My answer is maybe.'",
        _constrained_response,
    ),
    _spec(
        "length_constraints:number_words",
        "The number of words (runs of \\w) is 'less than' / 'at least' N.",
        _number_words,
        _count("num_words", "N, the word-count threshold"),
        _relation(),
    ),
    _spec(
        "length_constraints:number_sentences",
        "The number of sentences (Punkt, English) is 'less than' / 'at least' N.",
        _number_sentences,
        _count("num_sentences", "N, the sentence-count threshold"),
        _relation(),
    ),
    _spec(
        "length_constraints:number_paragraphs",
        "Exactly N paragraphs separated by the markdown divider ***.",
        _number_paragraphs,
        _count("num_paragraphs", "N, the exact number of paragraphs"),
    ),
    _spec(
        "keywords:existence",
        "Every keyword occurs (case-insensitive regex search).",
        _existence,
        KwargSpec("keywords", list[str], "the keywords that must occur (regexes)", regex=str),
    ),
    _spec(
        "keywords:forbidden_words",
        "No forbidden word occurs as a whole word (case-insensitive).",
        _forbidden_words,
        KwargSpec(
            "forbidden_words",
            list[str],
            "the words that must not occur (regexes, matched between \\b)",
            regex=lambda w: r"\b" + w + r"\b",
        ),
    ),
    _spec(
        "keywords:frequency",
        "The keyword occurs 'less than' / 'at least' N times (case-insensitive).",
        _frequency,
        KwargSpec("keyword", str, "the keyword to count (a regex)", regex=str),
        _count("frequency", "N, the occurrence threshold"),
        _relation(),
    ),
    _spec(
        "keywords:letter_frequency",
        "The letter occurs 'less than' / 'at least' N times (case-insensitive).",
        _letter_frequency,
        KwargSpec("letter", str, "one letter a-z (either case)"),
        _count("let_frequency", "N, the occurrence threshold"),
        _relation("let_relation"),
    ),
    _spec(
        "punctuation:no_comma",
        "The response contains no comma.",
        _no_comma,
    ),
    _spec(
        "startend:end_checker",
        "The response ends with the phrase (case-insensitive; a closing '\"' is ignored).",
        _end_checker,
        KwargSpec("end_phrase", str, "the phrase the response must end with"),
    ),
    _spec(
        "startend:quotation",
        "The entire response is wrapped in double quotation marks.",
        _quotation,
    ),
    _spec(
        "detectable_content:number_placeholders",
        "At least N placeholders in square brackets, such as [address].",
        _number_placeholders,
        _count("num_placeholders", "N, the minimum number of placeholders"),
    ),
    _spec(
        "detectable_content:postscript",
        "A line starting with the postscript marker, such as 'P.S.'.",
        _postscript,
        KwargSpec(
            "postscript_marker",
            str,
            "'P.S.' or 'P.P.S' (matched loosely), or another marker (a regex)",
            regex=_postscript_pattern,
        ),
    ),
    _spec(
        "combination:repeat_prompt",
        "The response starts by repeating the request word for word (case-insensitive).",
        _repeat_prompt,
        KwargSpec(
            "prompt_to_repeat",
            str,
            "the request to repeat; defaults to the prompt passed to follows()/check()",
            required=False,
        ),
    ),
    _spec(
        "combination:two_responses",
        "Two different responses separated by six asterisks: ******.",
        _two_responses,
    ),
]

INSTRUCTIONS: Mapping[str, InstructionSpec] = MappingProxyType({s.id: s for s in _SPECS})


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _lookup(instruction_id: Any) -> InstructionSpec:
    if not isinstance(instruction_id, str):
        raise ConfigError(
            f"An IFEval instruction id must be a string such as 'punctuation:no_comma', "
            f"got {instruction_id!r}."
        )
    spec = INSTRUCTIONS.get(instruction_id)
    if spec is not None:
        return spec
    if instruction_id in _UNSUPPORTED:
        raise UnknownNameError(
            f"IFEval instruction {instruction_id!r} is not supported: "
            f"{_UNSUPPORTED[instruction_id]}. Supported: {', '.join(INSTRUCTIONS)}."
        )
    raise unknown("IFEval instruction", instruction_id, INSTRUCTIONS)


def _bad(instruction_id: str, name: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{instruction_id}: kwarg {name!r} = {value!r} is invalid; {fix}")


def _normalise(instruction_id: str, ks: KwargSpec, value: Any) -> Any:
    name = ks.name
    if ks.type is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(instruction_id, name, value, f"use an integer >= 1 ({ks.help}).")
        return value
    if ks.type is str:
        if not isinstance(value, str) or not value.strip():
            raise _bad(instruction_id, name, value, f"use a non-empty string ({ks.help}).")
        if ks.choices is not None and value not in ks.choices:
            choices = " or ".join(repr(c) for c in ks.choices)
            raise _bad(instruction_id, name, value, f"use {choices}.{suggest(value, ks.choices)}")
        if name == "letter":
            if len(value) != 1 or not ("a" <= value.lower() <= "z"):
                raise _bad(instruction_id, name, value, "use a single letter a-z, such as 'e'.")
            return value.lower()
        if name == "prompt_to_repeat":
            return value
        stripped = value.strip()
        if ks.regex is not None:
            _compiles(instruction_id, name, stripped, ks.regex)
        return stripped
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        hint = f" such as [{value!r}]" if isinstance(value, str) else ""
        raise _bad(instruction_id, name, value, f"use a list of strings{hint} ({ks.help}).")
    if not value or any(not isinstance(v, str) or not v.strip() for v in value):
        raise _bad(
            instruction_id, name, value, f"use a non-empty list of non-empty strings ({ks.help})."
        )
    for v in value:
        _compiles(instruction_id, name, v, ks.regex or str)
    return list(value)


def _compiles(instruction_id: str, name: str, value: str, pattern: Callable[[str], str]) -> None:
    try:
        re.compile(pattern(value))
    except re.error as e:
        raise _bad(
            instruction_id,
            name,
            value,
            f"IFEval matches it as a regular expression and it does not compile ({e}); "
            f"escape special characters, e.g. {re.escape(value)!r}.",
        ) from None


def validate(instruction_id: str, kwargs: Mapping[str, Any] | None) -> dict:
    """Checked, normalised kwargs for `instruction_id`.

    Kwargs whose value is None count as absent (IFEval's dataset rows carry every kwarg name,
    most of them null). Raises UnknownNameError for an unknown instruction id or kwarg name,
    and ConfigError for a missing or bad value.
    """
    spec = _lookup(instruction_id)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(
            f"{instruction_id}: kwargs must be a mapping of kwarg name to value, got {kwargs!r}."
        )
    given = {k: v for k, v in kwargs.items() if v is not None}
    for name, value in given.items():
        if name not in spec.kwargs:
            if not spec.kwargs:
                raise UnknownNameError(
                    f"{instruction_id} takes no kwargs, got {name!r} = {value!r}; remove it."
                )
            raise unknown("kwarg", str(name), spec.kwargs, where=instruction_id)
    out = {}
    for name, ks in spec.kwargs.items():
        if name in given:
            out[name] = _normalise(instruction_id, ks, given[name])
        elif ks.required:
            raise ConfigError(
                f"{instruction_id}: kwarg {name!r} is missing; add it ({ks.help}). "
                f"Kwargs: {', '.join(spec.kwargs)}."
            )
    return out


def _resolved(instruction_id: str, kwargs: dict, prompt: str) -> dict:
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kwargs:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"{instruction_id}: kwarg 'prompt_to_repeat' is missing and no prompt was "
                f"given; pass prompt_to_repeat or prompt=..."
            )
        return {**kwargs, "prompt_to_repeat": prompt}
    return kwargs


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """IFEval's eight loose-mode variants of `response`, the response itself first."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [variant.replace("*", "") for variant in cut]


def _strict(spec: InstructionSpec, kwargs: Mapping[str, Any], response: str) -> bool:
    return bool(response.strip()) and spec.checker(response, kwargs)


def follows(
    instruction_id: str, kwargs: Mapping[str, Any] | None, response: str, *, prompt: str = ""
) -> bool:
    """Whether `response` follows one instruction, checked strictly as IFEval does."""
    spec = _lookup(instruction_id)
    normalised = _resolved(instruction_id, validate(instruction_id, kwargs), prompt)
    return _strict(spec, normalised, _text(response))


def check(
    response: str,
    instructions: Sequence[Mapping[str, Any]],
    *,
    prompt: str = "",
    mode: Literal["strict", "loose"] = "strict",
) -> list[bool]:
    """One verdict per instruction (``{"id": ..., "kwargs": {...}}``) for `response`.

    Every instruction is validated before any is checked. In loose mode an instruction is
    followed when any of `loose_variants(response)` follows it strictly.
    """
    if mode not in ("strict", "loose"):
        raise unknown("IFEval mode", str(mode), ("strict", "loose"))
    if isinstance(instructions, (str, Mapping)) or not isinstance(instructions, Sequence):
        raise ConfigError(
            f"instructions must be a list of {{'id': ..., 'kwargs': {{...}}}}, "
            f"got {instructions!r}."
        )
    response = _text(response)
    plan = []
    for i, item in enumerate(instructions):
        if not isinstance(item, Mapping) or "id" not in item:
            raise ConfigError(
                f"instructions[{i}] must be a mapping with an 'id' (and optional 'kwargs'), "
                f"got {item!r}."
            )
        extra = set(item) - {"id", "kwargs"}
        if extra:
            raise unknown(
                "instruction field",
                sorted(map(str, extra))[0],
                ("id", "kwargs"),
                where=f"instructions[{i}]",
            )
        spec = _lookup(item["id"])
        kwargs = _resolved(spec.id, validate(spec.id, item.get("kwargs")), prompt)
        plan.append((spec, kwargs))
    candidates = [response] if mode == "strict" else loose_variants(response)
    return [any(_strict(spec, kwargs, r) for r in candidates) for spec, kwargs in plan]


def _text(response: Any) -> str:
    if not isinstance(response, str):
        raise ConfigError(f"A response must be a string, got {type(response).__name__}.")
    return response

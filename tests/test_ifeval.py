"""Tests for mergesearch.eval.ifeval: IFEval-style instruction-following checks."""

from __future__ import annotations

import random

import pytest

from mergesearch.errors import ConfigError, UnknownNameError
from mergesearch.eval.ifeval import (
    INSTRUCTIONS,
    check,
    count_sentences,
    count_words,
    follows,
    loose_variants,
    split_sentences,
    validate,
    word_tokenize,
)

CAP = "change_case:capital_word_frequency"
WORDS = "length_constraints:number_words"
SENTENCES = "length_constraints:number_sentences"

# (id, kwargs, response, strict verdict); every supported id has a True and a False case.
CASES = [
    ("change_case:english_capital", {}, "HELLO WORLD, THIS IS 2024!", True),
    ("change_case:english_capital", {}, "HELLO World", False),
    ("change_case:english_capital", {}, "1234 !!", False),
    ("change_case:english_lowercase", {}, "hello world, this is fine.", True),
    ("change_case:english_lowercase", {}, "hello World", False),
    (CAP, {"capital_frequency": 2, "capital_relation": "at least"}, "I LOVE NASA.", True),
    (CAP, {"capital_frequency": 3, "capital_relation": "at least"}, "I LOVE NASA.", True),
    (CAP, {"capital_frequency": 4, "capital_relation": "at least"}, "I LOVE NASA.", False),
    (CAP, {"capital_frequency": 3, "capital_relation": "less than"}, "I LOVE NASA.", False),
    (CAP, {"capital_frequency": 4, "capital_relation": "less than"}, "I LOVE NASA.", True),
    # Treebank splits DON'T into DO + N'T and CANNOT into CAN + NOT: four capital words.
    (CAP, {"capital_frequency": 4, "capital_relation": "at least"}, "DON'T. CANNOT.", True),
    (CAP, {"capital_frequency": 1, "capital_relation": "at least"}, "HELLO,world", True),
    (CAP, {"capital_frequency": 1, "capital_relation": "at least"}, "HELLO-world", False),
    ("detectable_format:json_format", {}, '{"a": [1, 2]}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True),
    ("detectable_format:json_format", {}, "```JSON\n[1, 2]\n```", True),
    ("detectable_format:json_format", {}, 'Here: {"a": 1}', False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "**bold**\n* one", True),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nverse", True),
    ("detectable_format:title", {}, "<< >> and <<\n>>", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and *b*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**a** *b*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and * *", False),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nintro\nSECTION 2\nbody",
        True,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "SECTION 1\nintro\nSECTION 2\nbody",
        False,
    ),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "My answer is yes", False),
    (WORDS, {"num_words": 5, "relation": "less than"}, "one two three four", True),
    (WORDS, {"num_words": 4, "relation": "less than"}, "one two three four", False),
    (WORDS, {"num_words": 4, "relation": "at least"}, "one two three four", True),
    (WORDS, {"num_words": 5, "relation": "at least"}, "one two, three-four", False),
    (WORDS, {"num_words": 3, "relation": "at least"}, "don't stop_now", True),
    (SENTENCES, {"num_sentences": 3, "relation": "at least"}, "One. Two? Three!", True),
    (SENTENCES, {"num_sentences": 3, "relation": "less than"}, "One. Two? Three!", False),
    (
        SENTENCES,
        {"num_sentences": 2, "relation": "less than"},
        "Dr. Smith came at 3 p.m. today.",
        True,
    ),
    (
        SENTENCES,
        {"num_sentences": 2, "relation": "at least"},
        "Dr. Smith came at 3 p.m. today.",
        False,
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo", True),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "***\none\n***\ntwo\n***",
        True,
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\n\n***\ntwo", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n\ntwo", False),
    ("keywords:existence", {"keywords": ["Fox", "dog"]}, "the fox and the DOG", True),
    ("keywords:existence", {"keywords": ["fox", "cat"]}, "the fox and the dog", False),
    ("keywords:existence", {"keywords": ["cat"]}, "concatenate", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "concatenate", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "A Dog.", False),
    (
        "keywords:frequency",
        {"keyword": "the", "frequency": 2, "relation": "at least"},
        "The theme",
        True,
    ),
    (
        "keywords:frequency",
        {"keyword": "the", "frequency": 2, "relation": "less than"},
        "The theme",
        False,
    ),
    (
        "keywords:frequency",
        {"keyword": "the", "frequency": 3, "relation": "less than"},
        "The theme",
        True,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "E", "let_frequency": 3, "let_relation": "at least"},
        "Eve sees",
        True,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "e", "let_frequency": 4, "let_relation": "less than"},
        "Eve sees",
        False,
    ),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        'Done. any other QUESTIONS?"',
        True,
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Any other questions? Bye.",
        False,
    ),
    ("startend:quotation", {}, '  "wrapped"  ', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, "'single'", False),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "[name] at [address]",
        True,
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "[name] at address]",
        False,
    ),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np. s. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS bye", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. bye", False),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Hi.\nnote: bye", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, " say HI. Hi!", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi! Say hi.", False),
    ("combination:two_responses", {}, "first\n******\nsecond", True),
    ("combination:two_responses", {}, "******first******second******", True),
    ("combination:two_responses", {}, "same\n******\nsame", False),
    ("combination:two_responses", {}, "a******\n******b", False),
]


def test_every_supported_instruction_has_following_and_violating_cases() -> None:
    for verdict in (True, False):
        assert {case[0] for case in CASES if case[3] is verdict} == set(INSTRUCTIONS)
    assert len(INSTRUCTIONS) == 23


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_strict(instruction_id: str, kwargs: dict, response: str, expected: bool) -> None:
    assert follows(instruction_id, kwargs, response) is expected
    assert check(response, [{"id": instruction_id, "kwargs": kwargs}]) == [expected]


@pytest.mark.parametrize("instruction_id", sorted(INSTRUCTIONS))
def test_blank_response_never_follows(instruction_id: str) -> None:
    kwargs = next(case[1] for case in CASES if case[0] == instruction_id)
    for blank in ("", " \n\t "):
        assert check(blank, [{"id": instruction_id, "kwargs": kwargs}], mode="loose") == [False]


def test_vacuous_instructions_hold_on_any_non_blank_text() -> None:
    assert follows("keywords:forbidden_words", {"forbidden_words": ["x"]}, ".")
    assert follows(WORDS, {"num_words": 1, "relation": "less than"}, "?!")
    assert not follows(WORDS, {"num_words": 1, "relation": "less than"}, "  ")


def test_loose_variants_are_ifevals_eight() -> None:
    variants = loose_variants("Sure:\n**BODY**\nBye")
    assert variants == [
        "Sure:\n**BODY**\nBye",
        "**BODY**\nBye",
        "Sure:\n**BODY**",
        "**BODY**",
        "Sure:\nBODY\nBye",
        "BODY\nBye",
        "Sure:\nBODY",
        "BODY",
    ]
    assert loose_variants("one line") == ["one line", "", "", "", "one line", "", "", ""]


def test_loose_forgives_a_preamble_line() -> None:
    response = "Sure, here it is:\nTHE ANSWER IS FORTY-TWO."
    capitals = [{"id": "change_case:english_capital"}]
    assert check(response, capitals) == [False]
    assert check(response, capitals, mode="loose") == [True]


def test_loose_forgives_a_closing_line_and_markdown_asterisks() -> None:
    response = 'Here you go:\n```json\n{"a": 1}\n```\nHope this helps!'
    assert check(response, [{"id": "detectable_format:json_format"}], mode="loose") == [True]
    assert check(response, [{"id": "detectable_format:json_format"}]) == [False]

    quoted = '**"To be or not to be."**'
    assert check(quoted, [{"id": "startend:quotation"}]) == [False]
    assert check(quoted, [{"id": "startend:quotation"}], mode="loose") == [True]

    ending = "Thanks.\nAny other questions?\n(generated)"
    end = [{"id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}}]
    assert check(ending, end) == [False]
    assert check(ending, end, mode="loose") == [True]


def test_loose_is_never_stricter_and_still_fails_real_violations() -> None:
    response = "Intro line\nsome lower case text, with a comma\noutro"
    instructions = [
        {"id": "change_case:english_capital"},
        {"id": "punctuation:no_comma"},
        {"id": WORDS, "kwargs": {"num_words": 3, "relation": "at least"}},
    ]
    assert check(response, instructions) == [False, False, True]
    assert check(response, instructions, mode="loose") == [False, False, True]


def test_check_returns_one_verdict_per_instruction_in_order() -> None:
    response = "<<Title>>\n\nI have [one] placeholder, and the end."
    verdicts = check(
        response,
        [
            {"id": "detectable_format:title"},
            {"id": "punctuation:no_comma", "kwargs": {}},
            {"id": "detectable_content:number_placeholders", "kwargs": {"num_placeholders": 1}},
            {"id": "startend:end_checker", "kwargs": {"end_phrase": "the END."}},
            {"id": "detectable_format:title"},
        ],
    )
    assert verdicts == [True, False, True, True, True]
    assert check(response, []) == []


def test_repeat_prompt_defaults_to_the_prompt() -> None:
    item = [{"id": "combination:repeat_prompt"}]
    assert check("Write a haiku. Leaves fall.", item, prompt="write a haiku.") == [True]
    assert check("Leaves fall.", item, prompt="Write a haiku.") == [False]
    assert follows("combination:repeat_prompt", {}, "Write it. Done", prompt="Write it.")
    explicit = [{"id": "combination:repeat_prompt", "kwargs": {"prompt_to_repeat": "Hi."}}]
    assert check("Hi. there", explicit, prompt="something else") == [True]
    with pytest.raises(ConfigError, match="prompt_to_repeat"):
        check("Write a haiku.", item)


def test_relations_at_the_threshold() -> None:
    text = "a b c"
    for relation, n, expected in [
        ("less than", 3, False),
        ("less than", 4, True),
        ("at least", 3, True),
        ("at least", 4, False),
        ("less than", 1, False),
        ("at least", 1, True),
    ]:
        assert follows(WORDS, {"num_words": n, "relation": relation}, text) is expected


# --- tokenisation: expectations checked against nltk 3.10 + lm-eval's IFEval ----------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("", []),
        ("   ", []),
        ("no final stop", ["no final stop"]),
        ("Very bad acting!!! I promise.", ["Very bad acting!!!", "I promise."]),
        ("(Sent1.) Sent2.", ["(Sent1.)", "Sent2."]),
        ('He said "Go." Then he left.', ['He said "Go."', "Then he left."]),
        ("Hello Dr. Smith. How are you?", ["Hello Dr. Smith.", "How are you?"]),
        (
            "It costs 3.5 dollars at 5 p.m. on Monday.",
            ["It costs 3.5 dollars at 5 p.m. on Monday."],
        ),
        ("We met in the U.S. The trip was long.", ["We met in the U.S.", "The trip was long."]),
        ("Use tools, e.g. a hammer.", ["Use tools, e.g.", "a hammer."]),
        ("I got an A. The teacher smiled.", ["I got an A.", "The teacher smiled."]),
        ("J. K. Rowling wrote it.", ["J. K. Rowling wrote it."]),
        ("Steps:\n1. Open it.\n2. close it.", ["Steps:\n1.", "Open it.", "2. close it."]),
        ("I am fine... thanks. Wait... What?", ["I am fine... thanks.", "Wait... What?"]),
        ("Wait... The end.", ["Wait...", "The end."]),
        ("Line one\n\nLine two. Three", ["Line one\n\nLine two.", "Three"]),
    ],
)
def test_split_sentences_matches_punkt(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences
    assert count_sentences(text) == len(sentences)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("I CAN'T DO IT.", ["I", "CA", "N'T", "DO", "IT", "."]),
        ("Cannot, gonna!", ["Can", "not", ",", "gon", "na", "!"]),
        ('"Hi," she said.', ["``", "Hi", ",", "''", "she", "said", "."]),
        ("It's 3,000 (about) -- ok?", ["It", "'s", "3,000", "(", "about", ")", "--", "ok", "?"]),
        ("THE U.S. IS BIG. WE'LL SEE.", ["THE", "U.S.", "IS", "BIG", ".", "WE", "'LL", "SEE", "."]),
        (
            "a*b; x@y & #1 $5 ...",
            ["a", "*", "b", ";", "x", "@", "y", "&", "#", "1", "$", "5", "..."],
        ),
    ],
)
def test_word_tokenize_matches_nltk(text: str, tokens: list[str]) -> None:
    assert word_tokenize(text) == tokens


def test_count_words_is_w_plus_runs() -> None:
    assert count_words("Don't stop-me now, 3.14 café_au_lait!") == 8
    assert count_words("") == 0


# --- validation ------------------------------------------------------------------------------


def test_validate_normalises() -> None:
    assert (
        validate(
            "keywords:letter_frequency",
            {"letter": "Q", "let_frequency": 2, "let_relation": "at least"},
        )["letter"]
        == "q"
    )
    assert validate("startend:end_checker", {"end_phrase": "  Bye.\n"}) == {"end_phrase": "Bye."}
    assert validate("keywords:existence", {"keywords": ("a", "b")}) == {"keywords": ["a", "b"]}
    # IFEval's dataset rows carry every kwarg name, unused ones as None
    row = {"num_highlights": None, "relation": "less than", "num_words": 300, "keywords": None}
    assert validate(WORDS, row) == {"num_words": 300, "relation": "less than"}
    assert validate("punctuation:no_comma", None) == {}
    assert validate("combination:repeat_prompt", {}) == {}


def test_unknown_instruction_suggests_the_nearest() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'punctuation:no_comma'"):
        validate("punctuation:no_commas", {})
    with pytest.raises(UnknownNameError, match="'length_constraints:number_words'"):
        check("x", [{"id": "length_constraint:number_words", "kwargs": {}}])
    with pytest.raises(UnknownNameError, match="language detection"):
        follows("language:response_language", {"language": "en"}, "hello")


def test_unknown_kwarg_suggests_the_nearest() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'num_words'"):
        validate(WORDS, {"num_word": 3, "relation": "at least"})
    with pytest.raises(UnknownNameError, match="takes no kwargs.*'num_words'"):
        validate("punctuation:no_comma", {"num_words": 3})


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "fragments"),
    [
        (WORDS, {"relation": "at least"}, ["'num_words' is missing", "add it"]),
        (WORDS, {"num_words": 3}, ["'relation' is missing"]),
        (WORDS, {"num_words": "3", "relation": "at least"}, ["'num_words' = '3'", "integer >= 1"]),
        (WORDS, {"num_words": 0, "relation": "at least"}, ["'num_words' = 0", "integer >= 1"]),
        (WORDS, {"num_words": True, "relation": "at least"}, ["'num_words' = True"]),
        (
            WORDS,
            {"num_words": 3, "relation": "less_than"},
            ["'less_than'", "Did you mean 'less than'"],
        ),
        (
            WORDS,
            {"num_words": 3, "relation": "at most"},
            ["'at most'", "'less than' or 'at least'"],
        ),
        ("keywords:existence", {"keywords": "fox"}, ["'keywords' = 'fox'", "['fox']"]),
        ("keywords:existence", {"keywords": []}, ["'keywords' = []", "non-empty list"]),
        ("keywords:existence", {"keywords": ["ok", ""]}, ["non-empty strings"]),
        ("keywords:existence", {"keywords": ["f(x"]}, ["'f(x'", "regular expression", "f\\\\(x"]),
        (
            "keywords:frequency",
            {"keyword": "(", "frequency": 1, "relation": "at least"},
            ["'keyword' = '('", "escape"],
        ),
        (
            "keywords:letter_frequency",
            {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
            ["'letter' = 'ab'", "single letter"],
        ),
        (
            "keywords:letter_frequency",
            {"letter": "7", "let_frequency": 1, "let_relation": "at least"},
            ["'letter' = '7'"],
        ),
        ("startend:end_checker", {"end_phrase": "   "}, ["'end_phrase'", "non-empty string"]),
        (
            "detectable_format:multiple_sections",
            {"section_spliter": "[", "num_sections": 2},
            ["'section_spliter' = '['"],
        ),
        ("detectable_content:postscript", {"postscript_marker": 5}, ["'postscript_marker' = 5"]),
    ],
)
def test_bad_kwargs_name_the_kwarg_the_value_and_the_fix(
    instruction_id: str, kwargs: dict, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        validate(instruction_id, kwargs)
    assert not isinstance(err.value, UnknownNameError)
    message = str(err.value)
    assert message.startswith(instruction_id)
    for fragment in fragments:
        assert fragment in message


def test_malformed_calls() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'loose'"):
        check("x", [], mode="lose")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="instructions must be a list"):
        check("x", {"id": "punctuation:no_comma"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"instructions\[1\] must be a mapping with an 'id'"):
        check("x", [{"id": "punctuation:no_comma"}, {"kwargs": {}}])
    with pytest.raises(UnknownNameError, match="Did you mean 'kwargs'"):
        check("x", [{"id": "punctuation:no_comma", "kwarg": {}}])
    with pytest.raises(ConfigError, match="kwargs must be a mapping"):
        validate("punctuation:no_comma", ["x"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a string"):
        follows("punctuation:no_comma", {}, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="instruction id must be a string"):
        validate(3, {})  # type: ignore[arg-type]


def test_specs_describe_their_kwargs() -> None:
    spec = INSTRUCTIONS["keywords:letter_frequency"]
    assert list(spec.kwargs) == ["letter", "let_frequency", "let_relation"]
    assert spec.kwargs["let_relation"].choices == ("less than", "at least")
    assert spec.kwargs["let_frequency"].type is int
    assert all(k.required for k in spec.kwargs.values())
    assert not INSTRUCTIONS["combination:repeat_prompt"].kwargs["prompt_to_repeat"].required
    assert INSTRUCTIONS["keywords:existence"].kwargs["keywords"].type == list[str]
    for instruction_id, spec in INSTRUCTIONS.items():
        assert spec.id == instruction_id and spec.help and callable(spec.checker)
        assert all(k.help for k in spec.kwargs.values())


# --- side by side with lm-evaluation-harness's IFEval ----------------------------------------

_BLOCKS = [
    "The quick brown fox jumps over the lazy dog.",
    "Dr. Smith arrived at 3 p.m. on Monday.",
    "I CAN'T BELIEVE IT!",
    "Is this the U.S. embassy?",
    "Prices rose 3.5% in Q3, e.g. in retail.",
    "Wait... what happened next?",
    "She met J. K. Rowling in London.",
    "THIS IS VERY IMPORTANT, said the manager.",
    'He said "hello." Then he left.',
    "It's gonna be fine; don't worry.",
    "My answer is yes.",
    "Mr. and Mrs. Jones live on Main St. near the park.",
    "NASA and the FBI work with the U.N. too.",
    "the end",
    "Any other questions?",
    "Is there anything else I can help with?",
    "P.S. I love you.",
    "p.p.s see you soon",
    "[name] lives at [address].",
    "<<A Title>>",
    "<<>>",
    "*highlighted* text and **bold** text",
    "* bullet one",
    "- dash item",
    "SECTION 1",
    "Section 2",
    "***",
    "******",
    '{"a": 1, "b": [1, 2]}',
    "```json",
    "```",
    "1. First item",
    "2. second item",
    "Sure, here it is:",
    "Hope this helps!",
    "...",
    "(See note 4.) Then we stop.",
    "I got an A. The teacher was happy.",
    "We'll see, won't we?",
    "Cannot stop. Gimme more.",
]

_CONFIGS = [
    ("change_case:english_capital", {}),
    ("change_case:english_lowercase", {}),
    (CAP, {"capital_frequency": 1, "capital_relation": "at least"}),
    (CAP, {"capital_frequency": 4, "capital_relation": "less than"}),
    (CAP, {"capital_frequency": 8, "capital_relation": "at least"}),
    ("detectable_format:json_format", {}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}),
    ("detectable_format:title", {}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3}),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 1}),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}),
    ("detectable_format:constrained_response", {}),
    (WORDS, {"num_words": 12, "relation": "less than"}),
    (WORDS, {"num_words": 30, "relation": "at least"}),
    (SENTENCES, {"num_sentences": 2, "relation": "less than"}),
    (SENTENCES, {"num_sentences": 3, "relation": "at least"}),
    (SENTENCES, {"num_sentences": 6, "relation": "at least"}),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 1}),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}),
    ("keywords:existence", {"keywords": ["fox", "dog"]}),
    ("keywords:existence", {"keywords": ["smith"]}),
    ("keywords:forbidden_words", {"forbidden_words": ["the"]}),
    ("keywords:forbidden_words", {"forbidden_words": ["paris", "nasa"]}),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"}),
    ("keywords:frequency", {"keyword": "is", "frequency": 2, "relation": "at least"}),
    (
        "keywords:letter_frequency",
        {"letter": "e", "let_frequency": 10, "let_relation": "less than"},
    ),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 5, "let_relation": "at least"}),
    ("punctuation:no_comma", {}),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}),
    ("startend:quotation", {}),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("combination:repeat_prompt", {"prompt_to_repeat": "The quick brown fox jumps"}),
    ("combination:two_responses", {}),
]
_NLTK_IDS = {CAP, SENTENCES}


def _responses(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = rng.choices(_BLOCKS, k=rng.randint(1, 7))
        text = ""
        for part in parts:
            text += part + rng.choice([" ", " ", "\n", "\n\n", "  "])
        text = text.rstrip() if rng.random() < 0.7 else text
        case = rng.random()
        if case < 0.15:
            text = text.upper()
        elif case < 0.3:
            text = text.lower()
        if rng.random() < 0.15:
            text = f'"{text}"'
        if rng.random() < 0.2:
            text = "Sure, here it is:\n" + text
        if rng.random() < 0.2:
            text += "\nLet me know!"
        out.append(text)
    return out


def _punkt_installed(nltk: object) -> bool:
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")  # type: ignore[attr-defined]
    except LookupError:
        return False
    return True


@pytest.fixture(scope="module")
def lm_eval_ifeval():
    """lm-eval's IFEval scorer with langdetect pinned to English (a documented deviation)."""
    for name in ("langdetect", "immutabledict", "nltk"):
        pytest.importorskip(name)
    import nltk

    punkt = _punkt_installed(nltk)
    with pytest.MonkeyPatch.context() as patch:
        if not punkt:
            patch.setattr(nltk, "download", lambda *args, **kwargs: False)
        ifeval_utils = pytest.importorskip("lm_eval.tasks.ifeval.utils")
        from lm_eval.tasks.ifeval import instructions

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(instructions.langdetect, "detect", lambda text: "en")
        yield ifeval_utils, punkt


def _compare(ifeval_utils, configs: list, responses: list[str]) -> list[str]:
    ids = [c[0] for c in configs]
    kwargs = [c[1] for c in configs]
    items = [{"id": i, "kwargs": k} for i, k in configs]
    mismatches = []
    for response in responses:
        example = ifeval_utils.InputExample(
            key=0, instruction_id_list=ids, prompt="", kwargs=kwargs
        )
        for mode, theirs in (
            ("strict", ifeval_utils.test_instruction_following_strict),
            ("loose", ifeval_utils.test_instruction_following_loose),
        ):
            expected = theirs(example, response).follow_instruction_list
            got = check(response, items, mode=mode)
            mismatches += [
                f"{mode} {ids[i]} {kwargs[i]} on {response!r}: lm-eval {e}, here {g}"
                for i, (e, g) in enumerate(zip(expected, got, strict=True))
                if e != g
            ]
    return mismatches


def test_matches_lm_eval_ifeval(lm_eval_ifeval) -> None:
    ifeval_utils, _ = lm_eval_ifeval
    configs = [c for c in _CONFIGS if c[0] not in _NLTK_IDS]
    responses = _responses(250) + _BLOCKS + [b.upper() for b in _BLOCKS] + ["", " "]
    assert _compare(ifeval_utils, configs, responses) == []


def test_matches_lm_eval_ifeval_nltk_counts(lm_eval_ifeval) -> None:
    ifeval_utils, punkt = lm_eval_ifeval
    if not punkt:
        pytest.skip("nltk's punkt_tab English model is not installed")
    import nltk

    responses = _responses(150, seed=1) + _BLOCKS + [b.upper() for b in _BLOCKS]
    for text in responses:
        assert split_sentences(text) == nltk.sent_tokenize(text), text
        assert word_tokenize(text) == nltk.word_tokenize(text), text
    configs = [c for c in _CONFIGS if c[0] in _NLTK_IDS]
    assert _compare(ifeval_utils, configs, responses[:80]) == []


def _noisy_texts(n: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    vocab = "cat dog plan time idea house river market paper garden engine signal".split()
    extras = [
        "Dr.",
        "e.g.",
        "etc.",
        "U.S.",
        "A.",
        "J.",
        "3.5",
        "1.",
        "...",
        ". . .",
        "p.m.",
        "Inc.",
        "(",
        ")",
        '"',
        "'",
        "\u201c",
        "\u201d",
        "--",
        "\u2014",
        "!",
        "?",
        "?!",
        ",",
        ";",
        ":",
        "*",
        "don't",
        "CAN'T",
        "cannot",
        "'tis",
        "gonna",
        "3,000",
        "x.y",
        "\n",
        "\n\n",
    ]
    texts = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 20)):
            word = rng.choice(extras) if rng.random() < 0.3 else rng.choice(vocab)
            word = rng.choice([word, word.capitalize(), word.upper()])
            if rng.random() < 0.15:
                word += rng.choice([".", "?", "...", '."', ".)", "'s"])
            words.append(word)
        texts.append(" ".join(words))
    return texts


def test_punkt_port_is_exact_with_the_full_orthographic_table(lm_eval_ifeval, monkeypatch) -> None:
    """With nltk's complete English table swapped in, sentences and tokens agree everywhere."""
    _, punkt = lm_eval_ifeval
    if not punkt:
        pytest.skip("nltk's punkt_tab English model is not installed")
    import nltk
    from nltk.tokenize import PunktTokenizer

    from mergesearch.eval import ifeval

    monkeypatch.setattr(
        ifeval, "_PUNKT_ORTHO", dict(PunktTokenizer("english")._params.ortho_context)
    )
    for text in _noisy_texts(400):
        assert split_sentences(text) == nltk.sent_tokenize(text), text
        assert word_tokenize(text) == nltk.word_tokenize(text), text

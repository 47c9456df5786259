"""Task files: every shipped task loads and is sound; every bad input is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch.errors import ConfigError, MergeSearchError, UnknownNameError
from mergesearch.eval.scorers import SCORERS, GenerationScorer
from mergesearch.eval.tasks import (
    find_task_files,
    load_task,
    load_tasks,
    parse_task,
    read_jsonl,
)

REPO = Path(__file__).parents[1]
EVALS = REPO / "evals"
SHIPPED = find_task_files(EVALS)
GENERATION_SCORERS = {name for name, cls in SCORERS.items() if issubclass(cls, GenerationScorer)}


# ---------------------------------------------------------------------------------------------
# Shipped task files
# ---------------------------------------------------------------------------------------------


def test_tasks_are_shipped() -> None:
    assert len(SHIPPED) >= 5, SHIPPED
    # All of them load together: no two share a name.
    assert len({t.name for t in load_tasks(SHIPPED)}) == len(SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_task_loads_and_is_sound(path: Path) -> None:
    task = load_task(path)
    assert task.path == path
    assert task.name == path.stem, "load_tasks finds a task by file name, so they must agree"
    assert task.spec.description

    proxy, held_out = task.examples("proxy"), task.examples("held_out")
    assert proxy and held_out
    assert all(ex.split == "proxy" for ex in proxy) and all(ex.split == "held_out" for ex in held_out)
    assert not {ex.query for ex in proxy} & {ex.query for ex in held_out}

    def rows(exs: tuple) -> set[str]:
        return {json.dumps(dict(ex.data), sort_keys=True) for ex in exs}

    assert not rows(proxy) & rows(held_out)
    # Within a split, no example repeats (it would weigh twice in the mean).
    for exs in (proxy, held_out):
        assert len({ex.query for ex in exs}) == len(exs)

    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} must begin with a comment header"
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("Run:" in line for line in header), f"{path.name}: header has no 'Run:' line"


GENERATION_TASKS = [
    p for p in SHIPPED if yaml.safe_load(p.read_text(encoding="utf-8"))["scorer"]["name"] in GENERATION_SCORERS
]


@pytest.mark.parametrize("path", GENERATION_TASKS, ids=lambda p: p.name)
def test_shipped_targets_score_full_marks(path: Path) -> None:
    """The reference answer of every example, used as the response, scores 1 (the data is right)."""
    task = load_task(path)
    assert isinstance(task.scorer, GenerationScorer) and task.spec.target is not None
    for split in ("proxy", "held_out"):
        examples = task.examples(split)
        if task.scorer.name == "code_pass":
            pytest.importorskip("mergesearch.eval.sandbox")
            examples = examples[::12]  # each one is a sandboxed process: a sample is enough
        scores = task.scorer.score_responses(examples, [ex.target for ex in examples])
        bad = [(ex.where, s.detail) for ex, s in zip(examples, scores) if s.score != 1.0]
        assert not bad, bad[:3]


def test_load_tasks_by_name_from_search_dir() -> None:
    names = [p.stem for p in SHIPPED[:2]]
    tasks = load_tasks(names, search_dirs=[EVALS])
    assert [t.name for t in tasks] == names
    assert [t.path for t in tasks] == SHIPPED[:2]
    typo = names[0][:-1] + "_"
    with pytest.raises(ConfigError) as err:
        load_tasks([typo], search_dirs=[EVALS])
    assert f"No task named {typo!r}" in str(err.value)
    assert f"Did you mean {names[0]!r}?" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

PROXY = [{"a": 1, "b": 2, "answer": "3"}, {"a": 2, "b": 2, "answer": "4"}, {"a": 3, "b": 5, "answer": "8"}]
HELD = [{"a": 7, "b": 1, "answer": "8"}, {"a": 9, "b": 9, "answer": "18"}]


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "add",
        "data": {"proxy": "proxy.jsonl", "held_out": "held.jsonl"},
        "prompt": "What is {a} + {b}?\n",
        "target": "{answer}",
        "scorer": {"name": "exact_match"},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_task(
    tmp: Path, task: dict[str, Any], files: dict[str, Any] | None = None, name: str = "task.yaml"
) -> Path:
    """Write ``task`` as YAML plus data files (rows, or raw text) into ``tmp``."""
    files = {"proxy.jsonl": PROXY, "held.jsonl": HELD, **(files or {})}
    for fname, content in files.items():
        if content is None:
            continue
        (tmp / fname).write_text(content if isinstance(content, str) else jsonl(content), encoding="utf-8")
    path = tmp / name
    path.write_text("# test task\n" + yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path


def refused(path: Path, *fragments: str, kind: type[MergeSearchError] = ConfigError) -> str:
    with pytest.raises(MergeSearchError) as err:
        load_task(path)
    assert isinstance(err.value, kind), type(err.value)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# Good task files
# ---------------------------------------------------------------------------------------------


def test_minimal_task_loads(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, spec()))
    proxy = task.examples("proxy")
    assert [ex.prompt for ex in proxy] == ["What is 1 + 2?\n", "What is 2 + 2?\n", "What is 3 + 5?\n"]
    assert [ex.target for ex in proxy] == ["3", "4", "8"]
    assert [ex.index for ex in proxy] == [0, 1, 2]
    assert proxy[1].where == f"{tmp_path / 'proxy.jsonl'}:2"
    assert task.prefix == ""
    assert task.spec.generation.max_new_tokens == 32 and task.spec.generation.stop == ()
    with pytest.raises(ConfigError, match="no 'fewshot' split"):
        task.examples("fewshot")


def test_held_out_is_optional(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, spec(data={"proxy": "proxy.jsonl"})))
    assert len(task.examples("proxy")) == 3
    with pytest.raises(ConfigError) as err:
        task.examples("held_out")
    assert "no 'held_out' split" in str(err.value) and "held_out: FILE.jsonl" in str(err.value)


def test_fewshot_prefix(tmp_path: Path) -> None:
    shots = [{"a": 10, "b": 10, "answer": "20"}, {"a": 11, "b": 1, "answer": "12"}, {"a": 4, "b": 4, "answer": "8"}]
    data = {"proxy": "proxy.jsonl", "held_out": "held.jsonl", "fewshot": "shots.jsonl"}
    path = write_task(
        tmp_path, spec(data=data, fewshot=2, fewshot_separator="\n\n"), {"shots.jsonl": shots}
    )
    task = load_task(path)
    prefix = "What is 10 + 10?\n20\n\nWhat is 11 + 1?\n12\n\n"
    assert task.prefix == prefix
    for split in ("proxy", "held_out"):
        for ex in task.examples(split):
            assert ex.prompt == prefix + ex.query
            assert ex.query == f"What is {ex.data['a']} + {ex.data['b']}?\n"
    assert task.render_prompt({"a": 5, "b": 6}) == prefix + "What is 5 + 6?\n"
    assert task.render_target({"answer": "11"}) == "11"
    assert len(task.examples("fewshot")) == 3


def test_fewshot_default_separator_and_unused_shots_may_repeat_proxy(tmp_path: Path) -> None:
    """Only the k shots used form the prefix; a later, unused line of the pool may equal a test example."""
    shots = [{"a": 10, "b": 10, "answer": "20"}, PROXY[0]]
    data = {"proxy": "proxy.jsonl", "fewshot": "shots.jsonl"}
    task = load_task(write_task(tmp_path, spec(data=data, fewshot=1), {"shots.jsonl": shots}))
    assert task.examples("proxy")[0].prompt == "What is 10 + 10?\n20\nWhat is 1 + 2?\n"


def test_literal_braces(tmp_path: Path) -> None:
    path = write_task(tmp_path, spec(prompt='Answer as JSON {{"sum": ...}}: {a}+{b}\n', target="{{{answer}}}"))
    ex = load_task(path).examples("proxy")[0]
    assert ex.prompt == 'Answer as JSON {"sum": ...}: 1+2\n'
    assert ex.target == "{3}"


def test_scorer_reference_setting_replaces_target(tmp_path: Path) -> None:
    path = write_task(tmp_path, spec(target=None, scorer={"name": "exact_match", "settings": {"reference": "{answer}"}}))
    task = load_task(path)
    assert task.examples("proxy")[0].target is None
    assert task.scorer.score_response(task.examples("proxy")[0], "3").score == 1.0


def test_duplicate_task_names_refused(tmp_path: Path) -> None:
    one = write_task(tmp_path, spec(), name="one.yaml")
    two = write_task(tmp_path, spec(), name="two.yaml")
    with pytest.raises(ConfigError) as err:
        load_tasks([one, two])
    assert "Two tasks are named 'add'" in str(err.value) and "two.yaml" in str(err.value)


def test_load_tasks_search_dir_paths_and_names(tmp_path: Path) -> None:
    write_task(tmp_path, spec(name="alpha"), name="alpha.yaml")
    write_task(tmp_path, spec(name="beta"), name="beta.yml")
    tasks = load_tasks(["alpha", "beta"], search_dirs=[tmp_path])
    assert [t.name for t in tasks] == ["alpha", "beta"]
    assert [p.name for p in find_task_files(tmp_path)] == ["alpha.yaml", "beta.yml"]
    # An explicit path works without search dirs.
    assert load_tasks([tmp_path / "alpha.yaml"])[0].name == "alpha"
    with pytest.raises(ConfigError) as err:
        load_tasks(["alpah"], search_dirs=[tmp_path])
    assert "Did you mean 'alpha'?" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Bad task files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["name", "data", "prompt", "scorer"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    task = spec()
    del task[field]
    refused(write_task(tmp_path, task), "task.yaml", f"missing required field {field!r}")


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    task = spec()
    task["promt"] = task.pop("prompt")
    refused(write_task(tmp_path, task), "task.yaml", "unknown key 'promt'", "Did you mean 'prompt'?")


def test_unknown_nested_key(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(generation={"max_tokens": 4})), "task.yaml", "generation.max_tokens")


def test_unknown_scorer_suggests(tmp_path: Path) -> None:
    refused(
        write_task(tmp_path, spec(scorer={"name": "exact_mach"})),
        "task.yaml",
        "Unknown scorer 'exact_mach'",
        "Did you mean 'exact_match'?",
        kind=UnknownNameError,
    )


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n", encoding="utf-8")
    refused(path, "list.yaml", "must be a YAML mapping")
    path.write_text("name: [unclosed\n", encoding="utf-8")
    refused(path, "list.yaml", "is not valid YAML")
    refused(tmp_path / "absent.yaml", "absent.yaml", "does not exist")


def test_bad_task_name_and_generation(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(name="two words")), "task name 'two words'")
    refused(write_task(tmp_path, spec(generation={"max_new_tokens": 0})), "generation.max_new_tokens")
    refused(write_task(tmp_path, spec(generation={"stop": ["\n", ""]})), "stop string is empty")


def test_empty_jsonl_line(tmp_path: Path) -> None:
    raw = jsonl(PROXY[:1]) + "\n" + jsonl(PROXY[1:])
    refused(write_task(tmp_path, spec(), {"proxy.jsonl": raw}), "proxy.jsonl:2", "empty line")


def test_whitespace_only_jsonl_line(tmp_path: Path) -> None:
    raw = jsonl(PROXY) + "   \n"
    refused(write_task(tmp_path, spec(), {"proxy.jsonl": raw}), "proxy.jsonl:4", "empty line")


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    raw = jsonl(PROXY[:2]) + '{"a": 1, "b": 2,\n'
    refused(write_task(tmp_path, spec(), {"held.jsonl": raw}), "held.jsonl:3", "not valid JSON")


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3", "null"])
def test_jsonl_line_not_an_object(tmp_path: Path, line: str) -> None:
    raw = jsonl(PROXY[:1]) + line + "\n"
    refused(write_task(tmp_path, spec(), {"proxy.jsonl": raw}), "proxy.jsonl:2", "expected a JSON object")


def test_read_jsonl_direct(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}', encoding="utf-8")  # no trailing newline is fine
    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"a": 2})]
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ConfigError, match="Cannot read data file"):
        read_jsonl(path)


def test_empty_data_file(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(), {"proxy.jsonl": ""}), "proxy.jsonl", "has no examples")


def test_missing_data_file(tmp_path: Path) -> None:
    path = write_task(tmp_path, spec(data={"proxy": "proxy.jsonl", "held_out": "nope.jsonl"}))
    refused(path, "nope.jsonl", "does not exist")


def test_example_missing_template_field(tmp_path: Path) -> None:
    rows = [PROXY[0], {"a": 4, "answer": "4"}]
    refused(write_task(tmp_path, spec(), {"proxy.jsonl": rows}), "proxy.jsonl:2", "no field 'b'", "it has: a, answer")


def test_example_missing_target_field(tmp_path: Path) -> None:
    rows = [*HELD, {"a": 4, "b": 0}]
    refused(write_task(tmp_path, spec(), {"held.jsonl": rows}), "held.jsonl:3", "no field 'answer'")


def test_regex_does_not_compile(tmp_path: Path) -> None:
    task = spec(scorer={"name": "regex_match", "settings": {"pattern": r"(\d+"}})
    refused(write_task(tmp_path, task), r"'(\\d+'", "does not compile")


@pytest.mark.parametrize(
    ("group", "fragment"),
    [(2, "group 2 does not exist"), ("num", "group 'num' is not a named group")],
)
def test_regex_group_does_not_exist(tmp_path: Path, group: Any, fragment: str) -> None:
    task = spec(scorer={"name": "regex_match", "settings": {"pattern": r"(\d+)", "group": group}})
    refused(write_task(tmp_path, task), fragment)


def test_regex_scorer_needs_a_reference(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(target=None, scorer={"name": "regex_match"})), "needs a reference answer")


def test_held_out_overlapping_proxy(tmp_path: Path) -> None:
    held = [HELD[0], PROXY[2]]
    msg = refused(write_task(tmp_path, spec(), {"held.jsonl": held}), "occur in two splits")
    assert f"{tmp_path / 'proxy.jsonl'}:3" in msg and f"{tmp_path / 'held.jsonl'}:2" in msg


def test_overlap_by_rendered_prompt(tmp_path: Path) -> None:
    """Two examples with the same prompt are the same question even if other fields differ."""
    held = [{"a": 1, "b": 2, "answer": "three"}]
    refused(write_task(tmp_path, spec(), {"held.jsonl": held}), "proxy.jsonl:1", "held.jsonl:1")


def test_fewshot_shot_overlapping_proxy(tmp_path: Path) -> None:
    data = {"proxy": "proxy.jsonl", "fewshot": "shots.jsonl"}
    path = write_task(tmp_path, spec(data=data, fewshot=1), {"shots.jsonl": [PROXY[1]]})
    refused(path, "shots.jsonl:1", "proxy.jsonl:2", "occur in two splits")


def test_fewshot_without_file(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(fewshot=2)), "fewshot is 2", "no fewshot file")


def test_fewshot_without_target(tmp_path: Path) -> None:
    data = {"proxy": "proxy.jsonl", "fewshot": "shots.jsonl"}
    task = spec(data=data, fewshot=1, target=None, scorer={"name": "exact_match", "settings": {"reference": "{answer}"}})
    refused(write_task(tmp_path, task, {"shots.jsonl": HELD}), "need a `target` template")


def test_fewshot_more_than_file_has(tmp_path: Path) -> None:
    data = {"proxy": "proxy.jsonl", "fewshot": "shots.jsonl"}
    path = write_task(tmp_path, spec(data=data, fewshot=3), {"shots.jsonl": HELD})
    refused(path, "shots.jsonl", "fewshot is 3", "only 2 examples")


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("What is {} + {b}?", "positional field '{}'"),
        ("What is {0} + {b}?", "positional field '{0}'"),
        ("What is {a + {b}?", "not a valid format string"),
        ("What is {a} + b}?", "not a valid format string"),
    ],
)
def test_bad_prompt_template(tmp_path: Path, prompt: str, fragment: str) -> None:
    refused(write_task(tmp_path, spec(prompt=prompt)), "task.yaml: prompt", fragment)


def test_bad_target_template(tmp_path: Path) -> None:
    refused(write_task(tmp_path, spec(target="{answer")), "task.yaml: target", "not a valid format string")


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        ({"strip": "perhaps"}, ("scorer 'exact_match' settings", "strip:", "boolean")),
        ({"ignore_case": [1]}, ("ignore_case:",)),
        ({"strp": True}, ("scorer 'exact_match' settings", "strp: unknown key; remove it or check its spelling")),
    ],
)
def test_bad_scorer_settings(tmp_path: Path, settings: dict, fragments: tuple[str, ...]) -> None:
    refused(write_task(tmp_path, spec(scorer={"name": "exact_match", "settings": settings})), "task.yaml", *fragments)


def test_bad_regex_settings(tmp_path: Path) -> None:
    task = spec(scorer={"name": "regex_match", "settings": {"select": "middle"}})
    refused(write_task(tmp_path, task), "select:", "'first' or 'last'")


def test_agreement_needs_reference_setting(tmp_path: Path) -> None:
    task = spec(target=None, scorer={"name": "agreement", "settings": {"metric": "argmax"}})
    refused(write_task(tmp_path, task), "scorer 'agreement' settings", "reference")
    task = spec(target=None, scorer={"name": "agreement", "settings": {"reference": "m", "metric": "cosine"}})
    refused(write_task(tmp_path, task), "metric:")


MC_ROWS = [
    {"q": "Pick the larger: 3 or 5?", "choices": ["3", "5"], "gold": 1},
    {"q": "Pick the larger: 9 or 2?", "choices": ["9", "2"], "gold": "9"},
]


def mc_spec(**settings: Any) -> dict[str, Any]:
    return spec(
        data={"proxy": "proxy.jsonl"}, prompt="{q}\n", target=None,
        scorer={"name": "multiple_choice", "settings": settings},
    )


def test_multiple_choice_loads_gold_index_or_string(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, mc_spec(), {"proxy.jsonl": MC_ROWS}))
    assert [task.scorer._gold(ex.data) for ex in task.examples("proxy")] == [1, 0]


@pytest.mark.parametrize("gold", [2, -1, "7", True, 1.0])
def test_multiple_choice_gold_out_of_range(tmp_path: Path, gold: Any) -> None:
    rows = [MC_ROWS[0], {**MC_ROWS[1], "gold": gold}]
    refused(write_task(tmp_path, mc_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:2", "'gold' is", "index 0..1")


@pytest.mark.parametrize("choices", [["only"], "3 or 5", ["3", 5]])
def test_multiple_choice_bad_choices(tmp_path: Path, choices: Any) -> None:
    rows = [{**MC_ROWS[0], "choices": choices, "gold": 0}]
    refused(write_task(tmp_path, mc_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:1", "list of 2+ strings")


def test_multiple_choice_missing_fields_and_bad_continuation(tmp_path: Path) -> None:
    rows = [{"q": "x", "options": ["a", "b"], "gold": 0}]
    refused(write_task(tmp_path, mc_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:1", "no field 'choices'")
    refused(write_task(tmp_path, mc_spec(continuation=" answer"), {"proxy.jsonl": MC_ROWS}), "must contain '{choice}'")


CODE_ROWS = [{"spec": "x plus 1", "tests": ["assert f(1) == 2", "assert f(0) == 1"]}]


def code_spec(**settings: Any) -> dict[str, Any]:
    return spec(
        data={"proxy": "proxy.jsonl"}, prompt="Write f(x) = {spec}\n", target=None,
        scorer={"name": "code_pass", "settings": settings},
    )


def test_code_pass_tests_not_valid_python(tmp_path: Path) -> None:
    rows = [*CODE_ROWS, {"spec": "x", "tests": ["assert f(1) ==", "assert True"]}]
    refused(write_task(tmp_path, code_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:2", "not valid Python")


@pytest.mark.parametrize("tests", [[], "", ["  "], [1], {"t": "assert 1"}])
def test_code_pass_tests_empty_or_not_strings(tmp_path: Path, tests: Any) -> None:
    rows = [{"spec": "x", "tests": tests}]
    refused(write_task(tmp_path, code_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:1", "'tests' must be")


def test_code_pass_settings_limits(tmp_path: Path) -> None:
    refused(write_task(tmp_path, code_spec(wall_s=0), {"proxy.jsonl": CODE_ROWS}), "wall_s")
    refused(write_task(tmp_path, code_spec(extract="fenced"), {"proxy.jsonl": CODE_ROWS}), "extract")
    refused(write_task(tmp_path, code_spec(prefix="import {}\n"), {"proxy.jsonl": CODE_ROWS}), "positional field")


def ifeval_spec(**settings: Any) -> dict[str, Any]:
    return spec(
        data={"proxy": "proxy.jsonl"}, prompt="{prompt}\n", target=None,
        scorer={"name": "ifeval", "settings": settings},
    )


def test_ifeval_unknown_instruction_id(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi", "instructions": [{"id": "punctuation:no_comma", "kwargs": {}}]},
        {"prompt": "Shout", "instructions": [{"id": "change_case:english_captial", "kwargs": {}}]},
    ]
    refused(
        write_task(tmp_path, ifeval_spec(), {"proxy.jsonl": rows}),
        "proxy.jsonl:2",
        "'change_case:english_captial'",
        "Did you mean 'change_case:english_capital'?",
        kind=UnknownNameError,
    )


@pytest.mark.parametrize(
    ("instructions", "fragment"),
    [
        ([], "non-empty list"),
        ("punctuation:no_comma", "non-empty list"),
        ([{"kwargs": {}}], "must be an object with an 'id'"),
        ([{"id": "length_constraints:number_words", "kwargs": {"relation": "at least"}}], "'num_words' is missing"),
        ([{"id": "keywords:existence", "kwargs": {"keywords": "cat"}}], "use a list of strings"),
    ],
)
def test_ifeval_bad_instructions(tmp_path: Path, instructions: Any, fragment: str) -> None:
    rows = [{"prompt": "x", "instructions": instructions}]
    refused(write_task(tmp_path, ifeval_spec(), {"proxy.jsonl": rows}), "proxy.jsonl:1", fragment)


def test_ifeval_bad_mode(tmp_path: Path) -> None:
    rows = [{"prompt": "x", "instructions": [{"id": "punctuation:no_comma"}]}]
    refused(write_task(tmp_path, ifeval_spec(mode="lenient"), {"proxy.jsonl": rows}), "mode:")


def test_parse_task_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p.jsonl").write_text(jsonl(PROXY), encoding="utf-8")
    task = parse_task(spec(data={"proxy": "d/p.jsonl"}), "inline", tmp_path)
    assert task.path is None and len(task.examples("proxy")) == 3
    # Absolute paths are taken as they are.
    task = parse_task(spec(data={"proxy": str(tmp_path / "d" / "p.jsonl")}), "inline", tmp_path / "elsewhere")
    assert len(task.examples("proxy")) == 3

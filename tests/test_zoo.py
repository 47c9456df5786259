"""The demo zoo: shipped eval data, training data hygiene, caching, sharding, verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesearch.eval.tasks import find_task_files, load_tasks
from mergesearch.zoo.build import (
    SOURCE_TASKS,
    TEXT_TASK,
    ZooBuildError,
    ZooConfig,
    _Batcher,
    _verify,
    build_zoo,
    default_evals_dir,
    merge_file_name,
    render_table,
)
from mergesearch.zoo.skills import SKILLS, write_eval_data

EVALS = Path(__file__).resolve().parents[1] / "evals"


def test_default_evals_dir_is_the_checkout():
    assert default_evals_dir() == EVALS


def test_shipped_eval_data_is_what_the_generators_make(tmp_path):
    written = write_eval_data(tmp_path)
    assert written
    for path in written:
        assert path.read_bytes() == (EVALS / "data" / path.name).read_bytes(), path.name


def test_every_skill_has_a_task_file():
    names = {p.stem for p in find_task_files(EVALS)}
    assert set(SOURCE_TASKS) <= names
    assert TEXT_TASK in names


def test_generators_are_deterministic():
    for skill in SKILLS.values():
        a = [next(skill.examples(7)) for _ in range(1)]
        b = [next(skill.examples(7)) for _ in range(1)]
        assert a == b


def test_training_stream_never_contains_an_eval_prompt():


    tasks = {t.name: t for t in load_tasks([*SOURCE_TASKS, TEXT_TASK], [EVALS])}
    banned = {ex.query for t in tasks.values() for split in t.splits.values() for ex in split}
    seen_banned = 0
    for name, task in tasks.items():
        skill = SKILLS["text" if name == TEXT_TASK else name]
        for data, _ in zip(skill.examples(0), range(3000)):
            seen_banned += task.render_prompt(data) in banned
    # The raw streams do hit eval examples (small spaces) ...
    assert seen_banned > 0

    class _Tok:
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    batcher = _Batcher(_Tok(), tasks, 0, banned)
    for name, task in tasks.items():
        for _ in range(3000):
            ids, labels = batcher.example(name)
            assert len(ids) == len(labels)
            if task.spec.target is None:
                prompt = bytes(ids[1:-1]).decode()
            else:
                prompt = bytes(i for i, lab in zip(ids, labels) if lab == -100).decode()
            # ... but the batcher drops them.
            assert prompt not in banned


def _table(values):
    return {src: dict(zip(["addition", "shift"], row)) for src, row in values.items()}


def test_verify_accepts_a_real_trade_off():
    table = _table({"base": (0.1, 0.1), "addition": (0.9, 0.0), "shift": (0.0, 0.8)})
    merges = _table({"uniform linear": (0.3, 0.3), "task arithmetic 0.5": (0.6, 0.5)})
    assert _verify(table, merges, ["addition", "shift"]) == []


def test_verify_names_every_failure():
    table = _table({"base": (0.9, 0.1), "addition": (0.9, 0.0), "shift": (0.95, 0.8)})
    merges = _table({"uniform linear": (0.7, 0.7), "ties": (0.6, 0.5)})
    problems = _verify(table, merges, ["addition", "shift"])
    text = "; ".join(problems)
    assert "addition expert (0.900) is not strictly best on addition" in text
    assert "shift is best on every skill" in text
    assert "uniform merge (0.700) is the best merge tried" in text


def test_render_table_marks_best_source():
    table = _table({"base": (0.1, 0.1), "addition": (0.9, 0.0), "shift": (0.0, 0.8)})
    text = render_table(table, _table({"uniform linear": (0.3, 0.3)}), ["addition", "shift"], "held_out")
    assert "| expert: addition | **0.90** | 0.00 |" in text
    assert "| uniform linear | 0.30 | 0.30 | 0.300 |" in text


TINY = ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2, threads=1)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    logs = []
    result = build_zoo(root, TINY, log=logs.append)
    return root, result, logs


def test_tiny_zoo_layout(tiny_zoo):
    root, result, _ = tiny_zoo
    assert result.rebuilt
    assert set(result.sources) == {"base", *SOURCE_TASKS}
    for path in result.sources.values():
        assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "qwen3" and config["head_dim"] >= 64
    sharded = result.sources[TINY.sharded_expert]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert (root / "TABLE.md").is_file()
    manifest = json.loads((root / "zoo.json").read_text())
    assert set(manifest["table"]) == set(result.sources)
    assert set(manifest["merges"]) >= {"uniform linear"}
    for name in manifest["merges"]:
        assert (root / "merges" / merge_file_name(name)).is_file()


def test_tiny_zoo_loads_in_the_engine(tiny_zoo):
    from mergesearch.eval.hf import TransformersEngine

    _, result, _ = tiny_zoo
    engine = TransformersEngine(result.sources["code"])
    assert len(engine.generate(["What is 1 + 2?\n"], max_new_tokens=3)) == 1
    engine.close()


def test_tiny_zoo_is_cached_until_an_input_changes(tiny_zoo, tmp_path):
    root, _, _ = tiny_zoo
    logs = []
    again = build_zoo(root, TINY, log=logs.append)
    assert not again.rebuilt
    assert "up to date" in logs[0]
    changed = build_zoo(root, TINY.model_copy(update={"seed": 1}), log=logs.append)
    assert changed.rebuilt
    build_zoo(root, TINY, log=logs.append)


def test_failed_verification_is_an_error_and_writes_no_manifest(tmp_path):
    config = TINY.model_copy(update={"verify": True, "verify_limit": 1, "skills": ("addition", "code")})
    with pytest.raises(ZooBuildError, match="trade-off"):
        build_zoo(tmp_path / "zoo", config, log=lambda _: None)
    assert not (tmp_path / "zoo" / "zoo.json").exists()


def test_unknown_skill_is_refused(tmp_path):
    from mergesearch.errors import ConfigError

    with pytest.raises(ConfigError, match="Unknown zoo skill 'additon'"):
        build_zoo(tmp_path, TINY.model_copy(update={"skills": ("additon",)}), log=lambda _: None)


@pytest.mark.slow
def test_full_zoo_shows_the_trade_off(tmp_path):
    """The shipped config builds a zoo that passes verification (about 5-10 minutes)."""
    result = build_zoo(tmp_path / "zoo", log=lambda _: None)
    assert result.rebuilt
    assert _verify(result.table, result.merges, SOURCE_TASKS) == []


def test_cli_eval_scores_a_zoo_model(tiny_zoo, tmp_path, capsys):
    from mergesearch.cli import main

    _, result, _ = tiny_zoo
    out = tmp_path / "scores.json"
    rc = main(["eval", "addition", "format", "--model", str(result.sources["addition"]),
               "--tasks-dir", str(EVALS), "--split", "both", "--limit", "2", "--json", str(out)])
    assert rc == 0
    dump = json.loads(out.read_text())
    assert set(dump) == {"addition/proxy", "addition/held_out", "format/proxy", "format/held_out"}
    assert all(len(v["scores"]) == 2 and 0 <= v["mean"] <= 1 for v in dump.values())
    assert "addition" in capsys.readouterr().out


def test_cli_eval_bad_split_and_unknown_task(tiny_zoo, capsys):
    from mergesearch.cli import main

    _, result, _ = tiny_zoo
    model = str(result.sources["base"])
    assert main(["eval", "addition", "--model", model, "--tasks-dir", str(EVALS), "--split", "test"]) == 2
    assert "--split 'test'" in capsys.readouterr().err
    assert main(["eval", "additon", "--model", model, "--tasks-dir", str(EVALS)]) == 2
    assert "Did you mean 'addition'" in capsys.readouterr().err


def test_cli_zoo_reuses_the_cache(tiny_zoo, tmp_path, capsys):
    """`mergesearch zoo` on an up-to-date folder prints the table without training."""
    import yaml

    from mergesearch.cli import main

    root, _, _ = tiny_zoo
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump(TINY.model_dump(mode="json")))
    assert main(["zoo", str(root), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "uniform linear" in out
    config.write_text("base_step: 3\n")
    assert main(["zoo", str(root), "--config", str(config)]) == 2
    assert "base_step" in capsys.readouterr().err

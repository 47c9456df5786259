"""`mergesearch export`: a stored trial as mergekit YAML, a checkpoint and a model card, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mergekit_helpers import assert_same_config, assert_same_tensors, load_weights, run_mergekit
from test_driver import TINY, write_study

from mergesearch.cli import main
from mergesearch.driver.config import load_study
from mergesearch.driver.driver import run_study
from mergesearch.driver.export import OpenedStudy, export_study, open_study, ranges
from mergesearch.driver.report import leaderboard, pareto_front
from mergesearch.errors import OutputError
from mergesearch.zoo.build import build_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Three finished tiny studies: linear (3 trials, baselines, held-out), ties and dare_ties."""
    root = tmp_path_factory.mktemp("export")
    zoo = root / "zoo"
    build_zoo(zoo, TINY)
    paths = {"linear": write_study(root / "linear", zoo)}
    for method in ("ties", "dare_ties"):
        paths[method] = write_study(root / method, zoo, method=method, space="layerwise_ties_dare",
                                    budget={"trials": 2}, baselines=False, top_k=1, write_checkpoint=False)
    for path in paths.values():
        run_study(load_study(path))
    return paths


def storage_of(path: Path) -> str:
    return f"sqlite:///{path.parent / 'out' / 'study.db'}"


def stored(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=storage_of(path))


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def no_leftovers(parent: Path, name: str) -> None:
    hidden = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not hidden, f"temporary folders left behind: {hidden}"


def test_export_best_writes_yaml_card_and_checkpoint(tmp_path, studies, capsys):
    path = studies["linear"]
    out = tmp_path / "best"
    rc, text, err = cli(capsys, path, out)
    assert rc == 0, err
    study = stored(path)
    # --best is the trial `mergesearch status` shows as best
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]["number"]
    assert f"Exported trial {best} of study t" in text
    trial = study.trials[best]
    plan = trial.user_attrs["plan"]

    config = (out / "config.yaml").read_text(encoding="utf-8")
    header, body = config[: len(config) - len(plan)], config[len(config) - len(plan):]
    assert body == plan, "the exported YAML must be the stored plan, exactly"
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"trial {best}" in header and "mergekit-yaml config.yaml OUT" in header
    assert "authority" not in header  # linear is deterministic
    assert (out / "mergekit_config.yml").read_text(encoding="utf-8") == config

    # the checkpoint: shards, config, tokenizer; the same merge the study wrote as its best model
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert_same_tensors(load_weights(out), load_weights(path.parent / "out" / "best" / "model"), exact=True)
    no_leftovers(tmp_path, "best")

    card = (out / "README.md").read_text(encoding="utf-8")
    fm = front_matter(card)
    models = [m["model"] for m in yaml.safe_load(plan)["models"]]
    assert fm["base_model"] == models
    assert {"merge", "mergekit", "mergesearch"} <= set(fm["tags"]) and fm["library_name"] == "transformers"
    held = study.user_attrs[f"held_out:{best}"]
    scores = trial.user_attrs["scores"]
    for task in ("perplexity", "order"):
        gap = scores[task] - held["scores"][task]
        assert (f"| {task} | 1 | {scores[task]:.4f} | {held['scores'][task]:.4f} | {gap:+.4f} |") in card
    assert f"**{held['value']:.4f}**" in card and f"**{held['gap']:+.4f}**" in card
    assert "1 / perplexity of short plain-text sentences." in card  # eval definition
    assert "| 6 of 48 | 4 of 96 |" in card  # examples scored of those in each split
    assert "Sampler: `random`" in card and "Trials: 3 complete" in card and "Study: `t`" in card
    assert "source: addition" in card and "uniform merge" in card  # the baselines
    assert "```yaml\n" + config.rstrip() + "\n```" in card
    for m in models:
        assert f"- {m}" in card


@pytest.mark.integration
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_mergekit_yaml_on_the_exported_yaml_gives_the_exported_checkpoint(tmp_path, studies, capsys, method):
    out = tmp_path / "export"
    rc, _, err = cli(capsys, studies[method], out)
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["merge_method"] == method
    theirs = run_mergekit((out / "config.yaml").read_text(encoding="utf-8"), tmp_path / "mergekit")
    assert_same_tensors(load_weights(out), load_weights(theirs))
    assert_same_config(out, theirs)


def test_random_method_export_says_the_checkpoint_is_the_authority(tmp_path, studies, capsys):
    path = studies["dare_ties"]
    out = tmp_path / "dare"
    rc, text, err = cli(capsys, path, out, "--format", "json")
    assert rc == 0, err
    data = json.loads(text)
    [e] = data["exports"]
    seed = stored(path).trials[e["trial"]].user_attrs["seed"]
    assert e["method"] == "dare_ties" and e["random"] is True and e["seed"] == seed
    header = [line for line in (out / "config.yaml").read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    header_text = " ".join(header)
    assert "RANDOM METHOD (dare_ties)" in header_text and "authority" in header_text
    assert f"--seed {seed}" in header_text
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "authority" in card and f"seed {seed}" in card
    # `mergesearch merge config.yaml --seed N` reproduces it bit for bit
    from mergesearch.merge.executor import run_merge
    from mergesearch.plan import load_plan

    run_merge(load_plan(out / "config.yaml"), tmp_path / "again", seed=seed)
    assert_same_tensors(load_weights(out), load_weights(tmp_path / "again"), exact=True)


def test_trial_n_exports_that_trial_and_a_missing_one_lists_the_trials(tmp_path, studies, capsys):
    path = studies["linear"]
    rc, _, err = cli(capsys, path, tmp_path / "t0", "--trial", "0")
    assert rc == 0, err
    assert (tmp_path / "t0" / "config.yaml").read_text(encoding="utf-8").endswith(stored(path).trials[0].user_attrs["plan"])
    rc, out, err = cli(capsys, path, tmp_path / "t9", "--trial", "9")
    assert rc == 2 and out == ""
    assert "has no trial 9" in err and "Its trials: 0-2" in err and "Traceback" not in err
    assert not (tmp_path / "t9").exists()
    rc, _, err = cli(capsys, path, tmp_path / "x", "--trial", "-1")
    assert rc == 2 and "has no trial -1" in err
    rc, _, err = cli(capsys, path, tmp_path / "x", "--trial", "1", "--pareto")
    assert rc == 2 and "one of --best, --trial N, --pareto" in err


def test_unknown_study_name_lists_the_studies_in_the_storage(tmp_path, studies, capsys):
    url = storage_of(studies["linear"])
    rc, out, err = cli(capsys, "--storage", url, "--study", "nope", tmp_path / "o")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert "No study 'nope'" in err and "Studies there: t." in err
    assert not (tmp_path / "o").exists()
    # --storage alone picks the only study (its baselines companion aside), like `status`
    rc, _, err = cli(capsys, "--storage", url, tmp_path / "o")
    assert rc == 0, err
    rc, _, err = cli(capsys, "--storage", url, "--study", "t.baselines", tmp_path / "b")
    assert rc == 2 and "holds the baselines of study 't'" in err


def test_a_study_without_complete_trials_is_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(study_name="empty", storage=url)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    rc, _, err = cli(capsys, "--storage", url, tmp_path / "o")
    assert rc == 2 and "has no complete trial yet" in err and "1 failed" in err
    rc, _, err = cli(capsys, "--storage", url, tmp_path / "o", "--trial", "0")
    assert rc == 2 and "Trial 0 of study 'empty' cannot be exported: it is failed" in err


def test_an_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, studies, capsys):
    path = studies["linear"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    rc, _, err = cli(capsys, path, out)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me"
    rc, _, err = cli(capsys, path, out, "--force")
    assert rc == 0, err
    assert not (out / "mine.txt").exists() and (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    no_leftovers(tmp_path, "o")
    # never the folder that holds the storage (or a source, or the study file)
    rc, _, err = cli(capsys, path, path.parent, "--force")
    assert rc == 2 and "holds the study storage" in err
    assert (path.parent / "out" / "study.db").is_file()


@pytest.mark.parametrize("exc", [OutputError("disk full"), RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_no_output_and_no_temporary_folder(tmp_path, studies, capsys, monkeypatch, exc):
    from mergesearch.merge import executor

    def failing(plan, out_dir, **kw):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise exc

    monkeypatch.setattr(executor, "run_merge", failing)
    path = studies["linear"]
    out = tmp_path / "o"
    if isinstance(exc, OutputError):
        rc, _, err = cli(capsys, path, out)
        assert rc == 2 and "disk full" in err
    elif isinstance(exc, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            export_study(open_study(path, None, None), out)
    else:
        with pytest.raises(RuntimeError):
            main(["export", str(path), str(out)])
    assert not out.exists()
    no_leftovers(tmp_path, "o")
    # with --force the old folder stays as it was
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises((OutputError, RuntimeError, KeyboardInterrupt)):
        export_study(open_study(path, None, None), out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    no_leftovers(tmp_path, "o")


def test_a_pareto_failure_after_the_first_trial_leaves_nothing(tmp_path, studies, monkeypatch):
    from mergesearch.driver import export as export_mod
    from mergesearch.merge import executor

    real, calls = executor.run_merge, []

    def second_fails(plan, out_dir, **kw):
        calls.append(out_dir)
        if len(calls) == 2:
            raise OutputError("no space left")
        return real(plan, out_dir, **kw)

    monkeypatch.setattr(executor, "run_merge", second_fails)
    monkeypatch.setattr(export_mod, "select_trials", lambda study, lb, mode, number=None: list(lb.rows[:2]))
    with pytest.raises(OutputError):
        export_study(open_study(studies["linear"], None, None), tmp_path / "p", mode="pareto")
    assert len(calls) == 2, "the first trial was merged before the second failed"
    assert not (tmp_path / "p").exists()
    no_leftovers(tmp_path, "p")


def test_pareto_exports_every_trial_of_the_front(tmp_path, studies, capsys):
    path = studies["linear"]
    out = tmp_path / "front"
    rc, text, err = cli(capsys, path, out, "--pareto", "--format", "json")
    assert rc == 0, err
    data = json.loads(text)
    lb = leaderboard(stored(path))
    expected = sorted(r.number for r in pareto_front(list(lb.rows), lb.tasks))
    assert sorted(data["trials"]) == expected and data["mode"] == "pareto"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", *(f"trial-{n}" for n in expected)])
    for n in expected:
        d = out / f"trial-{n}"
        assert (d / "config.yaml").read_text(encoding="utf-8").endswith(stored(path).trials[n].user_attrs["plan"])
        assert (d / "README.md").is_file() and (d / "model.safetensors").is_file()
    assert all(f"trial-{n}" in (out / "README.md").read_text(encoding="utf-8") for n in expected)


def test_json_output_is_one_object_with_paths_and_scores(tmp_path, studies, capsys):
    path = studies["linear"]
    out = tmp_path / "j"
    rc, text, err = cli(capsys, path, out, "--format", "json")
    assert rc == 0, err
    data = json.loads(text)
    assert data["study"] == "t" and data["mode"] == "best" and data["out"] == str(out)
    [e] = data["exports"]
    assert data["trials"] == [e["trial"]]
    assert e["config"] == str(out / "config.yaml") and e["card"] == str(out / "README.md")
    assert {"config.yaml", "README.md", "config.json", "model.safetensors"} <= set(e["files"])
    trial = stored(path).trials[e["trial"]]
    assert e["proxy"]["scores"] == pytest.approx(trial.user_attrs["scores"])
    assert e["held_out"]["value"] is not None and e["gap"] == pytest.approx(e["proxy"]["value"] - e["held_out"]["value"])
    assert e["random"] is False and e["tensors"] > 0
    rc, _, err = cli(capsys, path, tmp_path / "k", "--format", "yaml")
    assert rc == 2 and "--format 'yaml'" in err


def test_the_card_never_shows_a_database_password(tmp_path, studies):
    opened = open_study(studies["linear"], None, None)
    opened = OpenedStudy(opened.study, "postgresql://searcher:s3cret@db.example:5432/studies", opened.study_file)
    result = export_study(opened, tmp_path / "pg")
    card = (tmp_path / "pg" / "README.md").read_text(encoding="utf-8")
    assert "s3cret" not in card and "s3cret" not in json.dumps(result.to_json())
    assert "postgresql://searcher:***@db.example:5432/studies" in card


def test_ranges():
    assert ranges([]) == "none"
    assert ranges([3, 0, 1, 2, 6, 8, 9]) == "0-3, 6, 8-9"
    assert ranges([5]) == "5"

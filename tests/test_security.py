"""Static and quick checks that mergesearch never runs code it reads, and never leaks or writes
where a file tells it to: no unpickling, no trust_remote_code, only safe YAML loaders, no
eval/exec outside the sandbox, study names that cannot climb out of the output folder, --force
that cannot delete a source through `..`, and database passwords masked in what is printed."""

from __future__ import annotations

import ast
import re
import socket
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.driver.config import parse_study
from mergesearch.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "mergesearch"
SOURCES = sorted(PACKAGE.rglob("*.py"))
SANDBOX = PACKAGE / "eval" / "sandbox.py"
# eval() of an arithmetic expression the zoo builds itself from constants (never user input),
# with {'x': int} as its only globals; any other eval/exec outside the sandbox fails the test.
EVAL_ALLOWED = {(PACKAGE / "zoo" / "skills.py", "eval"): 1}


def _trees() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))) for p in SOURCES]


TREES = _trees()


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound by imports: {'yaml': 'yaml', 'safe_load': 'yaml.safe_load', 'tload': 'torch.load'}."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str] | None = None) -> str:
    """The called name with import aliases expanded ('yaml.load', 'torch.load', 'eval'); '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append((aliases or {}).get(node.id, node.id))
        return ".".join(reversed(parts))
    return ""


def _calls(name_re: str):
    for path, tree in TREES:
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and re.fullmatch(name_re, _dotted(node.func, aliases)):
                yield path, node


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 20 and SANDBOX in SOURCES


def test_nothing_imports_pickle_or_unpickles():
    bad = []
    for path, tree in TREES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [_where(path, node) for a in node.names
                        if a.name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "pickle", "cPickle", "dill", "cloudpickle", "joblib"):
                bad.append(_where(path, node))
    bad += [_where(p, n) for p, n in _calls(r"(pickle|dill|cloudpickle|joblib|pandas|numpy)\.(Unpickler|loads?|read_pickle)")]
    for path, node in _calls(r"numpy\.load"):   # np.load unpickles object arrays unless allow_pickle=False
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
            bad.append(_where(path, node))
    assert not bad, f"pickle used at {bad}"


def test_torch_load_only_with_weights_only_true():
    bad = []
    for path, node in _calls(r"torch\.load|torch\.serialization\.load"):
        kw = {k.arg: k.value for k in node.keywords}
        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            bad.append(_where(path, node))
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_no_trust_remote_code():
    bad = []
    for path, tree in TREES:
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.value.lineno}")
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not (
                            isinstance(v, ast.Constant) and v.value is False):
                        bad.append(_where(path, k))
    assert not bad, f"trust_remote_code enabled at {bad}"


SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def test_yaml_only_with_safe_loaders():
    bad = []
    for path, node in _calls(r"yaml\.(unsafe_load|unsafe_load_all|full_load|full_load_all)"):
        bad.append(_where(path, node))
    for path, tree in TREES:
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func, aliases) in ("yaml.load", "yaml.load_all"):
                loader = ({k.arg: k.value for k in node.keywords}.get("Loader")
                          or (node.args[1] if len(node.args) > 1 else None))
                if loader is None or _dotted(loader, aliases) not in SAFE_LOADERS:
                    bad.append(_where(path, node))
            elif isinstance(node, (ast.Attribute, ast.Name)) and _dotted(node, aliases) in (
                    "yaml.FullLoader", "yaml.UnsafeLoader", "yaml.Loader", "yaml.CFullLoader",
                    "yaml.CUnsafeLoader", "yaml.CLoader"):
                bad.append(_where(path, node))
    assert not bad, f"YAML loaded without a safe loader at {bad}"


def test_no_eval_or_exec_outside_the_sandbox():
    seen: dict[tuple[Path, str], int] = {}
    # compile() alone only checks syntax (scorers.py validates test code that way); running a code
    # object needs eval/exec, which this scan catches.
    for path, node in _calls(r"eval|exec|builtins\.eval|builtins\.exec|__builtins__\.eval|__builtins__\.exec"):
        if path == SANDBOX:
            continue
        name = _dotted(node.func).split(".")[-1]
        seen[(path, name)] = seen.get((path, name), 0) + 1
    unexpected = {f"{p.relative_to(PACKAGE.parent)}: {n} x{c}" for (p, n), c in seen.items()
                  if EVAL_ALLOWED.get((p, n)) != c}
    assert not unexpected, f"eval/exec outside mergesearch/eval/sandbox.py: {sorted(unexpected)}"


# ---------------------------------------------------------------------------------------------
# paths from study files


def _study(name: str, **extra) -> dict:
    return {"name": name, "sources": {"base": "base", "models": ["a", "b"]}, "method": "linear",
            "space": "dirichlet_linear", "evals": {"tasks": ["addition"]}, "budget": {"trials": 1}, **extra}


@pytest.mark.parametrize("name", ["../../evil", "..", ".", "a/../../evil", "/etc/evil", "a/b", "..\\evil",
                                  "a\\..\\..\\evil", ".hidden", "evil/", "~/evil", "evil\n", "", "a b"])
def test_a_study_name_cannot_be_a_path(name, tmp_path):
    with pytest.raises(ConfigError, match="name"):
        parse_study(_study(name), "study file", tmp_path / "study.yaml")


@pytest.mark.parametrize("name", ["demo", "demo.v2", "run:3-b_x", "A1..b"])
def test_the_default_output_dir_stays_in_runs(name, tmp_path):
    sf = parse_study(_study(name), "study file", tmp_path / "study.yaml")
    out = sf.output_dir.resolve()
    assert out.parent == (tmp_path / "runs").resolve() and out.name == name


def test_run_with_a_climbing_name_writes_nothing(tmp_path, capsys):
    study_dir = tmp_path / "a" / "b"
    study_dir.mkdir(parents=True)
    path = study_dir / "study.yaml"
    path.write_text(yaml.safe_dump(_study("../../evil")), encoding="utf-8")
    before = sorted(p for p in tmp_path.rglob("*"))
    for cmd in (["run", str(path)], ["status", str(path)], ["export", str(path), str(tmp_path / "o")]):
        assert main(cmd) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error:") and "name" in err and "Traceback" not in out + err, err
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil").exists() and not (tmp_path / "runs").exists()


def test_export_force_cannot_replace_a_source_through_dotdot(tmp_path, capsys):
    """`export ... SRC_SIBLING/../SRC --force` resolves to a source folder: refused, source kept."""
    import optuna

    from mergesearch.testing import build_tiny_model, perturb_model

    base = build_tiny_model(tmp_path / "base", "qwen3", num_layers=1)
    ft0 = perturb_model(base, tmp_path / "ft0", seed=1)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    trial = study.ask()
    trial.set_user_attr("plan", yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 1.0}}, {"model": str(ft0), "parameters": {"weight": 1.0}}]}))
    study.tell(trial, 0.5)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for out in (f"{ft0}/../base", f"{tmp_path}/nowhere/../base", str(base)):
        rc = main(["export", "--storage", url, out, "--force"])
        o, err = capsys.readouterr()
        assert rc == 2, (o, err)
        assert "holds the source" in err and "--force would delete it" in err and "Traceback" not in o + err, err
        assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base.")]


# ---------------------------------------------------------------------------------------------
# passwords


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed once we return: connecting is refused at once


SECRET = "s3cr3t-Pa55word"


@pytest.mark.parametrize("args", [
    lambda url, study: ["status", "--storage", url],
    lambda url, study: ["status", "--storage", url, "--study", "x"],
    lambda url, study: ["status", str(study)],
    lambda url, study: ["export", "--storage", url, str(study.parent / "o")],
    lambda url, study: ["run", str(study)],
], ids=["status-storage", "status-storage-study", "status-file", "export-storage", "run-file"])
def test_a_postgres_password_is_never_printed(args, tmp_path, capsys):
    pytest.importorskip("psycopg")
    url = f"postgresql://ms_user:{SECRET}@127.0.0.1:{_closed_port()}/mergesearch"
    study = tmp_path / "study.yaml"
    models = tmp_path / "models"
    if not (models / "base").exists():
        from mergesearch.testing import build_tiny_model, perturb_model

        base = build_tiny_model(models / "base", "qwen3", num_layers=1)
        for i in range(2):
            perturb_model(base, models / f"ft{i}", seed=i)
    study.write_text(yaml.safe_dump({
        **_study("pw"), "sources": {"base": "models/base", "models": ["models/ft0", "models/ft1"]},
        "storage": url}), encoding="utf-8")
    rc = main(args(url, study))
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith("error:") and "Traceback" not in out + err, err
    assert SECRET not in out + err, out + err
    assert "ms_user" in err and "127.0.0.1" in err, err   # still says which server it tried


def test_mask_url_hides_passwords():
    from mergesearch.driver.storage import mask_url

    for url in (f"postgresql://u:{SECRET}@h:5432/db", f"postgresql+psycopg2://u:{SECRET}@h/db",
                f"postgresql://u:{SECRET}@h:notaport/db", f"mysql://u:{SECRET}@h/db"):
        masked = mask_url(url)
        assert SECRET not in masked and "u" in masked and "h" in masked, masked

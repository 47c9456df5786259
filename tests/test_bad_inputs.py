"""Every bad input a user can give is refused through the CLI with exit code 2 and one clear
`error:` line that names the problem (and the fix), never a traceback, and no output folder."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.testing import build_tiny_model, perturb_model

DROPPED = "model.layers.2.self_attn.k_proj.weight"
PRUNED_INTERMEDIATE = 96


# ---------------------------------------------------------------------------------------------
# helpers


def write_yaml(tmp_path: Path, config: Any, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    if isinstance(config, str):
        path.write_text(config, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def linear(*models: Path, weights: tuple[float, ...] | None = None, **extra: Any) -> dict:
    weights = weights or (1.0,) * len(models)
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **extra,
    }


def with_base(method: str, base: Path, other: Path, other_params: dict | None = None,
              **extra: Any) -> dict:
    other_entry: dict[str, Any] = {"model": str(other)}
    if other_params:
        other_entry["parameters"] = other_params
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(base)}, other_entry],
        **extra,
    }


def refused(capsys: pytest.CaptureFixture[str], config_path: Path, out: Path, *fragments: str,
            command: str = "merge", extra_args: tuple[str, ...] = ()) -> str:
    """Run the CLI and check the refusal contract; returns stderr."""
    args = [command, str(config_path)]
    if command == "merge":
        args += [str(out), "--quiet", *extra_args]
    rc = main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, f"exit code {rc}; stdout={captured.out!r} stderr={err!r}"
    assert "error:" in err, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in stderr: {err!r}"
    if command == "merge":
        assert not out.exists(), f"{out} was created"
        leftovers = list(out.parent.glob(f".{out.name}.partial-*"))
        assert not leftovers, f"temporary folders left behind: {leftovers}"
    return err


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "merged"


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory, qwen3_family: dict[str, Path],
               tokenizer_dir: Path) -> dict[str, Path]:
    """Sources that are incompatible with qwen3_family['base'] in one way each."""
    root = tmp_path_factory.mktemp("odd_models")
    base = qwen3_family["base"]
    reshape: dict[str, tuple[int, ...]] = {}
    for i in range(4):
        reshape[f"model.layers.{i}.mlp.gate_proj.weight"] = (PRUNED_INTERMEDIATE, 64)
        reshape[f"model.layers.{i}.mlp.up_proj.weight"] = (PRUNED_INTERMEDIATE, 64)
        reshape[f"model.layers.{i}.mlp.down_proj.weight"] = (64, PRUNED_INTERMEDIATE)
    return {
        "dropped": perturb_model(base, root / "dropped", seed=7, drop=[DROPPED]),
        "pruned": perturb_model(base, root / "pruned", seed=8, reshape=reshape),
        "vocab640": build_tiny_model(root / "vocab640", "qwen3", num_layers=4, vocab_size=640,
                                     tokenizer_dir=tokenizer_dir),
        "six_layers": build_tiny_model(root / "six_layers", "qwen3", num_layers=6,
                                       tokenizer_dir=tokenizer_dir),
    }


# ---------------------------------------------------------------------------------------------
# names and keys


@pytest.mark.parametrize("command", ["merge", "explain"])
def test_unknown_merge_method_suggests_nearest(capsys, tmp_path, out, qwen3_family, command):
    cfg = with_base("slerpp", qwen3_family["base"], qwen3_family["ft0"], parameters={"t": 0.5})
    refused(capsys, write_yaml(tmp_path, cfg), out, "Unknown merge method 'slerpp'",
            "Did you mean 'slerp'?", command=command)


@pytest.mark.parametrize("command", ["merge", "explain"])
def test_unknown_parameter_suggests_nearest(capsys, tmp_path, out, qwen3_family, command):
    cfg = with_base("ties", qwen3_family["base"], qwen3_family["ft0"],
                    {"weight": 1.0, "densty": 0.5})
    refused(capsys, write_yaml(tmp_path, cfg), out, "Unknown parameter 'densty'", "'ties'",
            "Did you mean 'density'?", command=command)


@pytest.mark.parametrize("command", ["merge", "explain"])
def test_unknown_top_level_key(capsys, tmp_path, out, qwen3_family, command):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"], paramters={"normalize": True})
    refused(capsys, write_yaml(tmp_path, cfg), out, "unknown key 'paramters'",
            "Did you mean 'parameters'?", command=command)


def test_unknown_conditional_key(capsys, tmp_path, out, qwen3_family):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"],
                 parameters={"normalize": [{"filtr": "mlp", "value": True}]})
    refused(capsys, write_yaml(tmp_path, cfg), out, "parameters.normalize[0]",
            "unknown key 'filtr'", "Did you mean 'filter'?")


# ---------------------------------------------------------------------------------------------
# parameter values


def test_linear_weights_all_zero(capsys, tmp_path, out, qwen3_family):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"], weights=(0.0, 0.0))
    refused(capsys, write_yaml(tmp_path, cfg), out, "linear weights", "sum to zero",
            "normalize: false")


@pytest.mark.parametrize("density", [-0.5, 0, 1.5])
def test_density_out_of_range(capsys, tmp_path, out, qwen3_family, density):
    cfg = with_base("ties", qwen3_family["base"], qwen3_family["ft0"],
                    {"weight": 1.0, "density": density})
    refused(capsys, write_yaml(tmp_path, cfg), out, f"density = {float(density)!r}",
            "out of range", "density must be in (0, 1]", str(qwen3_family["ft0"]))


def test_slerp_t_out_of_range(capsys, tmp_path, out, qwen3_family):
    cfg = with_base("slerp", qwen3_family["base"], qwen3_family["ft0"], parameters={"t": 1.5})
    refused(capsys, write_yaml(tmp_path, cfg), out, "t = 1.5", "out of range",
            "t must be in [0, 1]")


@pytest.mark.parametrize("method,params", [
    ("ties", {"weight": 1.0, "density": 0.5}),
    ("slerp", None),
])
def test_method_needs_base_model(capsys, tmp_path, out, qwen3_family, method, params):
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(qwen3_family["base"])}, {"model": str(qwen3_family["ft0"])}],
    }
    if params:
        cfg["models"][1]["parameters"] = params
    else:
        cfg["parameters"] = {"t": 0.5}
    refused(capsys, write_yaml(tmp_path, cfg), out, f"Merge method {method!r} needs `base_model:`",
            "add `base_model: <path>`")


def test_della_density_minus_epsilon_not_positive(capsys, tmp_path, out, qwen3_family):
    cfg = with_base("della", qwen3_family["base"], qwen3_family["ft0"],
                    {"weight": 1.0, "density": 0.1, "epsilon": 0.15})
    refused(capsys, write_yaml(tmp_path, cfg), out, "density +/- epsilon inside (0, 1)",
            "density=0.1", "epsilon=0.15", "Lower epsilon")


def test_della_epsilon_refused_by_explain(capsys, tmp_path, out, qwen3_family):
    cfg = with_base("della", qwen3_family["base"], qwen3_family["ft0"],
                    {"weight": 1.0, "density": 0.1, "epsilon": 0.15})
    refused(capsys, write_yaml(tmp_path, cfg), out, "epsilon", command="explain")


@pytest.mark.parametrize("dtype,fragment", [("int8", "Valid: bfloat16, float16, float32"),
                                            ("float8", "Did you mean 'float32'?")])
def test_unsupported_dtype(capsys, tmp_path, out, qwen3_family, dtype, fragment):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"], dtype=dtype)
    refused(capsys, write_yaml(tmp_path, cfg), out, f"dtype {dtype!r} is not supported", fragment)


def test_tokenizer_source_union(capsys, tmp_path, out, qwen3_family):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"], tokenizer_source="union")
    refused(capsys, write_yaml(tmp_path, cfg), out, "tokenizer_source 'union'", "not supported",
            "tokenizer_source: base")


# ---------------------------------------------------------------------------------------------
# config structure


def test_models_and_slices_both_given(capsys, tmp_path, out, qwen3_family):
    cfg = linear(qwen3_family["base"], qwen3_family["ft0"], slices=[
        {"sources": [{"model": str(qwen3_family["base"]), "layer_range": [0, 4]}]}])
    refused(capsys, write_yaml(tmp_path, cfg), out, "exactly one of `models` or `slices`")


def test_invalid_yaml_syntax(capsys, tmp_path, out):
    path = write_yaml(tmp_path, "merge_method: linear\nmodels: [\n  - model: x\n")
    refused(capsys, path, out, "is not valid YAML", str(path), "line 3")


def test_yaml_that_is_a_list(capsys, tmp_path, out):
    path = write_yaml(tmp_path, "- merge_method: linear\n- models: []\n")
    refused(capsys, path, out, "must be a YAML mapping", "`merge_method`", "got list")


def test_slice_sources_with_different_layer_counts(capsys, tmp_path, out, qwen3_family):
    cfg = {
        "merge_method": "linear",
        "slices": [{"sources": [
            {"model": str(qwen3_family["base"]), "layer_range": [0, 4]},
            {"model": str(qwen3_family["ft0"]), "layer_range": [0, 2]},
        ]}],
        "parameters": {"weight": 1.0},
    }
    refused(capsys, write_yaml(tmp_path, cfg), out, "slices[0]",
            "must cover the same number of layers", ": 4", ": 2")


def test_models_with_different_layer_counts(capsys, tmp_path, out, qwen3_family, odd_models):
    cfg = linear(qwen3_family["base"], odd_models["six_layers"])
    refused(capsys, write_yaml(tmp_path, cfg), out, "different numbers of layers", ": 4", ": 6",
            "`slices:`", "layer_range")


@pytest.mark.parametrize("command", ["merge", "explain"])
def test_layer_range_beyond_model(capsys, tmp_path, out, qwen3_family, command):
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(qwen3_family["base"]), "layer_range": [0, 6]}]}]}
    refused(capsys, write_yaml(tmp_path, cfg), out, "layer_range [0, 6]", "past its 4 layers",
            "<= 4", command=command)


# ---------------------------------------------------------------------------------------------
# sources


def test_source_path_does_not_exist(capsys, tmp_path, out, qwen3_family):
    missing = tmp_path / "no_such_model"
    cfg = linear(qwen3_family["base"], missing)
    refused(capsys, write_yaml(tmp_path, cfg), out, str(missing), "does not exist",
            "config.json and *.safetensors")


def test_folder_without_safetensors(capsys, tmp_path, out, qwen3_family):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(qwen3_family["base"] / "config.json", folder / "config.json")
    cfg = linear(qwen3_family["base"], folder)
    refused(capsys, write_yaml(tmp_path, cfg), out, str(folder), "no *.safetensors")


def test_tensor_missing_from_one_source(capsys, tmp_path, out, qwen3_family, odd_models):
    cfg = linear(qwen3_family["base"], odd_models["dropped"])
    refused(capsys, write_yaml(tmp_path, cfg), out, f"Tensor {DROPPED!r} is missing",
            str(odd_models["dropped"]))


def test_tensor_missing_from_first_source(capsys, tmp_path, out, qwen3_family, odd_models):
    cfg = linear(odd_models["dropped"], qwen3_family["base"])
    refused(capsys, write_yaml(tmp_path, cfg), out, f"Tensor {DROPPED!r} is missing",
            str(odd_models["dropped"]))


def test_shape_mismatch_pruned_mlp(capsys, tmp_path, out, qwen3_family, odd_models):
    base, pruned = qwen3_family["base"], odd_models["pruned"]
    cfg = linear(base, pruned)
    err = refused(capsys, write_yaml(tmp_path, cfg), out, "Shape mismatch in", str(base),
                  str(pruned))
    m = re.search(r"Shape mismatch in 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'", err)
    assert m, err
    if m.group(1) == "down":
        shapes = ([64, 128], [64, PRUNED_INTERMEDIATE])
    else:
        shapes = ([128, 64], [PRUNED_INTERMEDIATE, 64])
    assert f"{base}: {shapes[0]}" in err, err
    assert f"{pruned}: {shapes[1]}" in err, err


def test_vocabulary_size_mismatch(capsys, tmp_path, out, qwen3_family, odd_models):
    cfg = linear(qwen3_family["base"], odd_models["vocab640"])
    err = refused(capsys, write_yaml(tmp_path, cfg), out, "model.embed_tokens.weight",
                  "[512, 64]", "[640, 64]", str(odd_models["vocab640"]))
    assert "vocabulary" in err.lower(), err


class _PickleBomb:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_checkpoint_refused_and_never_unpickled(capsys, tmp_path, out, qwen3_family):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(qwen3_family["base"] / "config.json", folder / "config.json")
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_PickleBomb(marker))
    (folder / "pytorch_model.bin").write_bytes(payload)
    cfg = linear(qwen3_family["base"], folder)
    refused(capsys, write_yaml(tmp_path, cfg), out, str(folder), "pytorch_model.bin",
            "never unpickles", "safe_serialization=True")
    assert not marker.exists(), "the pickle was loaded"
    # Control: the payload is live, so its absence above really means nothing was unpickled.
    pickle.loads(payload)
    assert marker.exists()


def test_trust_remote_code_refused(capsys, tmp_path, out, qwen3_family):
    folder = tmp_path / "remote_code"
    shutil.copytree(qwen3_family["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    cfg = linear(qwen3_family["base"], folder)
    refused(capsys, write_yaml(tmp_path, cfg), out, str(folder), "trust_remote_code", "auto_map")


@pytest.mark.parametrize("command", ["merge", "explain"])
def test_different_architectures(capsys, tmp_path, out, qwen3_family, llama_family, command):
    cfg = linear(qwen3_family["base"], llama_family["base"])
    refused(capsys, write_yaml(tmp_path, cfg), out, "different architectures", "'qwen3'",
            "'llama'", command=command)


# ---------------------------------------------------------------------------------------------
# output folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_existing_output_refused_without_force(capsys, tmp_path, qwen3_family):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _snapshot(out)
    path = write_yaml(tmp_path, linear(qwen3_family["base"], qwen3_family["ft0"]))
    rc = main(["merge", str(path), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err, err
    assert "already exists" in err and "--force" in err, err
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_existing_output_replaced_with_force(capsys, tmp_path, qwen3_family):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    path = write_yaml(tmp_path, linear(qwen3_family["base"], qwen3_family["ft0"]))
    rc = main(["merge", str(path), str(out), "--quiet", "--force"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert not leftovers, leftovers


def test_failed_forced_merge_keeps_old_output(capsys, tmp_path, qwen3_family):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _snapshot(out)
    cfg = with_base("della", qwen3_family["base"], qwen3_family["ft0"],
                    {"weight": 1.0, "density": 0.1, "epsilon": 0.15})
    rc = main(["merge", str(write_yaml(tmp_path, cfg)), str(out), "--quiet", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "Traceback" not in err, err
    assert _snapshot(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------
# how errors are printed


def test_error_message_keeps_square_brackets(capsys, tmp_path, out, qwen3_family):
    missing = tmp_path / "llama[fp16]"
    cfg = linear(qwen3_family["base"], missing)
    refused(capsys, write_yaml(tmp_path, cfg), out, str(missing), "does not exist")


def test_error_message_with_closing_tag_text(capsys, tmp_path, out):
    path = write_yaml(tmp_path, "merge_method: linear\n'[/b]': 1\nmodels:\n  - model: x\n")
    refused(capsys, path, out, "unknown key '[/b]'")


@pytest.mark.parametrize("args, fragment", [
    (["status", "--top", "0"], "Invalid value for '--top'"),
    (["export", "--format", "json", "--no-such-option"], "No such option"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_print_one_message_and_exit_2(capsys, args, fragment):
    from mergesearch.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err

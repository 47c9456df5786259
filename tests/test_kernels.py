"""The fused Triton merge kernels equal the torch references.

On CPU the kernels run in Triton's interpreter, which Triton enables only when
``TRITON_INTERPRET=1`` is set before it is first imported: this module sets it around its own
import of Triton (and keeps Triton's ``interpret`` knob on), leaving the environment of other
tests as it was. If Triton was already imported without it (by another test module), the checks
re-run this file in a subprocess. The ``gpu`` test runs the same checks on CUDA with the compiled
kernels, in a subprocess with ``MERGESEARCH_KERNEL_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesearch.errors import ConfigError, MergeComputationError
from mergesearch.merge import methods, rng
from mergesearch.merge.methods import TensorInputs, merge_into
from mergesearch.merge.registry import get_method

DEVICE = os.environ.get("MERGESEARCH_KERNEL_TEST_DEVICE", "cpu")
EXACT = DEVICE == "cpu"
"""In the interpreter the kernels round exactly as torch on CPU; compiled code is only held to
one unit in the last place (reductions may sum in another order)."""

_saved = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton
    from mergesearch.merge import kernels
    from mergesearch.merge.kernels import _triton, linear, slerp, task_arithmetic, ties  # noqa: F401
    HAVE_TRITON = _triton.available()
except ImportError:
    HAVE_TRITON = False
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved
if HAVE_TRITON and DEVICE == "cpu" and _triton.interpreting():
    # Triton's lazily imported modules read the knob, not the environment, from here on.
    triton.knobs.runtime.interpret = True

READY = HAVE_TRITON and (DEVICE != "cpu" or _triton.interpreting())

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton; "
                       "Linux x86_64 only)"),
]
needs_kernels = pytest.mark.skipif(
    not READY, reason="triton was imported before TRITON_INTERPRET=1 was set; these checks run "
    "in a subprocess instead (test_interpreter_checks_in_a_fresh_process)")

SHAPE = (37, 129)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _sources(n: int, dtype: torch.dtype, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base] + [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n - 1)]
    return [t.to(dtype).to(DEVICE) for t in out]


def _gta(method: str, tensors, density=0.6, weights=(0.7, 0.4, -0.2), **shared) -> TensorInputs:
    spec = get_method(method)
    values = {p.name: p.default for p in spec.shared_params()}
    values.update(shared)
    per_input = [{}] + [{"weight": w, "density": density} for w in weights[: len(tensors) - 1]]
    return TensorInputs("model.layers.0.mlp.up_proj.weight", tensors, values, per_input, base=0,
                        seed=3)


def _both(method: str, x: TensorInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused result, reference result) in ``dtype``."""
    ref = torch.full(x.tensors[0].shape, 7.0, dtype=dtype, device=DEVICE)
    fused = torch.full_like(ref, 7.0)
    merge_into(method, x, ref)
    assert kernels.fused_merge_into(method, x, fused), kernels.unsupported_reason(method, x, fused)
    return fused, ref


def _assert_matches(fused: torch.Tensor, ref: torch.Tensor, exact: bool = EXACT, ulps: int = 1):
    if exact:
        assert torch.equal(fused, ref), f"max diff {(fused.double() - ref.double()).abs().max()}"
        return
    a, b = fused.double(), ref.double()
    tol = ulps * ULP[ref.dtype] * (b.abs() + b.abs().mean())
    assert bool(((a - b).abs() <= tol).all()), f"max diff {(a - b).abs().max()}"


# --------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_the_reference(dtype, normalize):
    tensors = _sources(3, dtype)
    x = TensorInputs("w", tensors, {"normalize": normalize},
                     [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.1}])
    _assert_matches(*_both("linear", x, dtype))


@needs_kernels
def test_linear_reads_mixed_dtypes_and_writes_another():
    tensors = [t.to(d) for t, d in zip(_sources(3, torch.float32),
                                        (torch.bfloat16, torch.float16, torch.float32))]
    x = TensorInputs("w", tensors, {"normalize": True},
                     [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}])
    _assert_matches(*_both("linear", x, torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_task_arithmetic_family_equals_the_reference(method, dtype):
    for shared in ({}, {"normalize": True, "lambda": 0.8}):
        x = _gta(method, _sources(4, dtype), **shared)
        fused, ref = _both(method, x, dtype)
        if method.startswith("dare"):
            # The L1 rescale factors are sums in another order: equal to float32 rounding.
            if dtype == torch.float32:
                assert torch.equal(fused == x.tensors[0], ref == x.tensors[0])
            _assert_matches(fused, ref, exact=False, ulps=2)
        else:
            _assert_matches(fused, ref)


@needs_kernels
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_masks_are_bit_identical_to_the_counter_based_reference(method):
    shape = (3, 2048 + 77)
    zeros = torch.zeros(shape, device=DEVICE)
    ones = torch.ones(shape, device=DEVICE)
    x = _gta(method, [zeros, ones, ones], density=0.37, weights=(1.0, 1.0), rescale=False,
             normalize=False)
    out = torch.empty(shape, device=DEVICE)
    x = TensorInputs(x.name, x.tensors, x.shared, x.per_input, base=0, seed=11)
    assert kernels.fused_merge_into(method, x, out)
    masks = [methods.random_keep(zeros, 0.37, rng.stream_key(11, row, x.name)) for row in (0, 1)]
    assert torch.equal(out, masks[0] + masks[1])
    assert 0.3 < float(masks[0].mean()) < 0.45 and not torch.equal(masks[0], masks[1])


@needs_kernels
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_trims_exactly_like_the_reference_with_ties_at_the_threshold(rescale):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(SHAPE, generator=g)
    # Deltas on a coarse grid: many elements share the threshold magnitude.
    tensors = [base] + [base + torch.randint(-3, 4, SHAPE, generator=g) * 0.25 for _ in range(3)]
    tensors = [t.to(DEVICE) for t in tensors]
    for density in (0.3, 0.55, 1.0):
        x = _gta("ties", tensors, density=density, rescale=rescale)
        _assert_matches(*_both("ties", x, torch.float32))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_equals_the_reference(dtype):
    a, _ = _sources(2, dtype)
    b = _sources(2, dtype, seed=9)[1]
    x = TensorInputs("w", [a, b], {"t": 0.3}, [{}, {}], base=0)
    # The coefficients come from sums in another order: equal to float32 rounding.
    _assert_matches(*_both("slerp", x, dtype), exact=False, ulps=2)
    x0 = TensorInputs("w", [a, b], {"t": 0.0}, [{}, {}], base=0)
    fused, _ = _both("slerp", x0, dtype)
    assert torch.equal(fused, a)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_of_colinear_tensors_falls_back_to_linear_interpolation(dtype):
    a = _sources(1, dtype)[0]
    x = TensorInputs("w", [a, (2 * a.float()).to(dtype)], {"t": 0.25}, [{}, {}], base=0)
    fused, ref = _both("slerp", x, dtype)
    _assert_matches(fused, ref, exact=True)
    _assert_matches(fused, (0.75 * a.float() + 0.25 * (2 * a.float())).to(dtype), exact=True)


@needs_kernels
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties", "ties", "slerp"])
def test_a_nan_or_inf_result_raises_naming_the_tensor(method):
    tensors = _sources(3 if method != "slerp" else 2, torch.float32)
    tensors[1] = tensors[1].clone()
    tensors[1][4, 5] = float("nan")
    if method == "linear":
        x = TensorInputs("model.norm.weight", tensors, {"normalize": True},
                         [{"weight": 1.0}] * 3)
    elif method == "slerp":
        x = TensorInputs("model.norm.weight", tensors, {"t": 0.5}, [{}, {}], base=0)
    else:
        x = TensorInputs("model.norm.weight", tensors, _gta(method, tensors).shared,
                         [{}] + [{"weight": 0.5, "density": 1.0}] * 2, base=0)
    out = torch.empty(SHAPE, device=DEVICE)
    with pytest.raises(MergeComputationError, match=r"'model\.norm\.weight'.*NaN/inf"):
        kernels.fused_merge_into(method, x, out)


@needs_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_an_overflow_in_the_output_dtype_raises():
    tensors = _sources(2, torch.float32)
    x = TensorInputs("big", tensors, {"normalize": False}, [{"weight": 1e6}, {"weight": 1e6}])
    with pytest.raises(MergeComputationError, match=r"'big'.*produced \d+ NaN/inf"):
        kernels.fused_merge_into("linear", x, torch.empty(SHAPE, dtype=torch.float16,
                                                           device=DEVICE))


@needs_kernels
def test_what_the_kernels_do_not_cover_returns_false_and_leaves_the_output_alone():
    tensors = _sources(3, torch.float32)
    out = torch.full(SHAPE, 7.0, device=DEVICE)
    cases = [
        ("nuslerp", TensorInputs("w", tensors, {"nuslerp_row_wise": False,
                                                "nuslerp_flatten": True},
                                 [{}, {"weight": 0.5}, {"weight": 0.5}], base=0),
         "not covered"),
        ("breadcrumbs", _gta("breadcrumbs", tensors), "not covered"),
        ("linear", TensorInputs("w", tensors, {"normalize": True},
                                [{"weight": torch.ones(SHAPE)}] * 3), "non-scalar 'weight'"),
        ("task_arithmetic", _gta("task_arithmetic", _sources(10, torch.float32),
                                 weights=(0.1,) * 9), "at most 8"),
        ("linear", TensorInputs("w", [t.t() for t in tensors], {"normalize": True},
                                [{"weight": 1.0}] * 3), "shape"),
    ]
    for method, x, why in cases:
        assert not kernels.fused_merge_into(method, x, out)
        assert why in kernels.unsupported_reason(method, x, out)
    assert bool((out == 7).all())
    x = TensorInputs("w", tensors, {"normalize": True}, [{"weight": 1.0}] * 3)
    assert not kernels.fused_merge_into("linear", x, torch.empty(SHAPE[::-1], device=DEVICE).t())


class _Engine:
    """Just the engine's parameters (what the Materializer writes into)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.params = {n: torch.zeros_like(t) for n, t in tensors.items()}
        self._tied = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.params


@pytest.fixture()
def resident(qwen3_family):
    from mergesearch.workers.worker import ResidentSources

    paths = {k: str(qwen3_family[k]) for k in ("base", "ft0", "ft1")}
    sources = ResidentSources(tuple(paths.values()))
    sources.tensors = {ref: {n: t.to(DEVICE) for n, t in ts.items()}
                       for ref, ts in sources.tensors.items()}
    yield sources, paths
    sources.close()


@needs_kernels
def test_the_materializer_uses_the_kernel_and_warns_once_per_uncovered_method(resident, caplog):
    from mergesearch.plan import loads_plan
    from mergesearch.workers.worker import Materializer

    sources, p = resident
    base = sources.tensors[p["base"]]
    linear_plan = loads_plan(
        f"merge_method: linear\nmodels:\n  - model: {p['base']}\n    parameters: {{weight: 0.2}}\n"
        f"  - model: {p['ft0']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {p['ft1']}\n    parameters: {{weight: 0.3}}\n", "plan")
    fused, reference = _Engine(base), _Engine(base)
    with caplog.at_level(logging.WARNING, logger="mergesearch.workers.worker"):
        Materializer(sources, fused, kernel="triton")(linear_plan)
        Materializer(sources, reference, kernel="torch")(linear_plan)
    assert not caplog.records
    for name, tensor in fused.params.items():
        _assert_matches(tensor, reference.params[name])

    nuslerp_plan = loads_plan(
        f"merge_method: nuslerp\nmodels:\n  - model: {p['ft0']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {p['ft1']}\n    parameters: {{weight: 0.5}}\n", "plan")
    materialise = Materializer(sources, _Engine(base), kernel="triton")
    with caplog.at_level(logging.WARNING, logger="mergesearch.workers.worker"):
        assert materialise(nuslerp_plan) > 1
        materialise(nuslerp_plan)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["merge method 'nuslerp' is not covered by the fused kernel; using the "
                        "torch reference"]
    with pytest.raises(ConfigError, match="'cuda'.*auto, triton or torch"):
        Materializer(sources, _Engine(base), kernel="cuda")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs ~30 GB of GPU memory; runs in the gpu check")
def test_dare_masks_past_two_to_the_32_elements_use_the_high_index_word():
    n = 2**32 + 4096
    zeros = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    ones = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    x = _gta("dare_linear", [zeros, ones], density=0.5, weights=(1.0,), rescale=False)
    assert kernels.fused_merge_into("dare_linear", x, out)
    idx = torch.arange(2**32 - 4096, n, device=DEVICE)
    want = rng.uniform_from_index(idx, rng.stream_key(x.seed, 0, x.name)) < 0.5
    assert torch.equal(out[2**32 - 4096:] == 1, want)


# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _pytest_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
         "-m", "triton", "-x"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(READY, reason="the checks ran in this process")
def test_interpreter_checks_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "MERGESEARCH_KERNEL_TEST_DEVICE": "cpu"}
    done = _pytest_in_subprocess(env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_without_triton_the_kernels_import_and_decline():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from mergesearch.merge import kernels\n"
        "from mergesearch.merge.kernels import linear, slerp, task_arithmetic, ties\n"
        "from mergesearch.merge.methods import TensorInputs\n"
        "x = TensorInputs('w', [torch.ones(3)], {'normalize': True}, [{'weight': 1.0}])\n"
        "assert not kernels.fused_merge_into('linear', x, torch.empty(3))\n"
        "print(kernels.unsupported_reason('linear', x, torch.empty(3)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton is not installed" in done.stdout


def test_every_kernel_compiles_for_a_gpu_without_one():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "mergesearch.merge.kernels._aot", "90"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled") == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(DEVICE != "cpu", reason="this is the launcher of the CUDA run")
def test_the_same_checks_pass_on_cuda_with_the_compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MERGESEARCH_KERNEL_TEST_DEVICE"] = "cuda"
    done = _pytest_in_subprocess(env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout

"""The Inductor-compiled CPU merge loops equal the torch references (each variant compiles once,
a few seconds; Inductor caches it on disk)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import MergeComputationError
from mergesearch.merge.kernels import cpu
from mergesearch.merge.methods import TensorInputs, merge_into

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not cpu.available(), reason="Inductor cannot compile here (no C++ compiler)")]

N = 40_000


def inputs(method: str, dtype: torch.dtype, seed: int = 0) -> TensorInputs:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g) * 0.02
    tensors = [base] + [base + 0.002 * torch.randn(N, generator=g) for _ in range(2)]
    tensors = [t.to(dtype) for t in tensors]
    tensors[1][:500] = tensors[0][:500]  # zero deltas: sign election and rescale edge cases
    tensors[2][1000:1400] = tensors[0][1000:1400] + 0.001  # equal magnitudes: TIES tie-break
    name = "model.layers.3.mlp.down_proj.weight"
    if method == "linear":
        return TensorInputs(name, tensors, {"normalize": True}, [{"weight": w} for w in (0.2, 0.5, 0.3)])
    shared = {"normalize": method != "task_arithmetic", "lambda": 0.9 if method == "task_arithmetic" else 1.0,
              "rescale": method.startswith("dare")}
    per = [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]
    return TensorInputs(name, tensors, shared, per, base=0, seed=11)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("method,dtype", [
    ("linear", torch.float32), ("linear", torch.bfloat16), ("task_arithmetic", torch.bfloat16),
    ("ties", torch.float16), ("dare_ties", torch.bfloat16), ("dare_linear", torch.float32),
])
def test_the_compiled_loop_equals_the_reference(method, dtype):
    x = inputs(method, dtype)
    ref, out = torch.empty(N, dtype=dtype), torch.empty(N, dtype=dtype)
    merge_into(method, x, ref)
    assert cpu.merge_into(method, x, out, min_numel=0)
    if method == "dare_linear":
        # DARE's L1 rescale factors are sums in another order than the reference's chunks:
        # the same mask, values equal to float32 rounding.
        assert torch.equal(out == x.tensors[0], ref == x.tensors[0])
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)
    else:
        assert torch.equal(bits(out), bits(ref)), f"{(out.double() - ref.double()).abs().max()}"


def test_small_tensors_uncovered_methods_and_other_devices_are_left_to_the_reference():
    x = inputs("linear", torch.float32)
    out = torch.zeros(N)
    assert not cpu.merge_into("linear", x, out)  # below MIN_NUMEL
    assert "fewer than" in cpu.unsupported("linear", x, out)
    assert not cpu.merge_into("slerp", x, out, min_numel=0)
    assert "no compiled CPU loop" in cpu.unsupported("model_stock", x, out, min_numel=0)
    assert bool((out == 0).all()), "a refusal touches nothing"


def test_a_non_finite_result_fails_naming_the_tensor():
    x = inputs("task_arithmetic", torch.bfloat16)
    x.tensors[2][7] = float("inf")
    with pytest.raises(MergeComputationError, match="down_proj.*1 NaN/inf"):
        cpu.merge_into("task_arithmetic", x, torch.empty(N, dtype=torch.bfloat16), min_numel=0)

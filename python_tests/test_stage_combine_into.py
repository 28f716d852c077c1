"""prg_fast::stage_combine_into (the sum written into a tensor the caller owns) against the
functional operator and the reference, every dtype mix the engine uses, in place, and its refusals."""
import pytest
import torch

from prg_fast.ode import ops, reference
from combine_checks import MIXED_DTYPES, make_inputs

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("n", [1, 7, 4099, 100003])
@pytest.mark.parametrize("n_terms", [0, 1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_the_functional_op(n, n_terms, dtype):
    base, terms, coeffs = make_inputs(n, n_terms, dtype, dtype)
    out = torch.full_like(base, float("nan"))
    assert ops.stage_combine_into(base, terms, coeffs, 0.9, out) is out
    # the same kernel, the same rounding order: bitwise equal to the functional op
    assert torch.equal(out, ops.stage_combine(base, terms, coeffs, 0.9))
    torch.testing.assert_close(out, reference.stage_combine(base, terms, coeffs, 0.9))


@pytest.mark.parametrize("base_dtype,term_dtype,out_dtype", MIXED_DTYPES)
def test_mixed_dtypes_take_the_dtype_of_out(base_dtype, term_dtype, out_dtype):
    base, terms, coeffs = make_inputs(5003, 3, base_dtype, term_dtype)
    out = torch.empty(base.shape, dtype=out_dtype)
    ops.stage_combine_into(base, terms, coeffs, 1.0, out)
    assert torch.equal(out, ops.stage_combine(base, terms, coeffs, 1.0, out_dtype))


@pytest.mark.parametrize("alias", ["base", "term"])
def test_in_place_on_an_input(alias):
    base, terms, coeffs = make_inputs(70001, 3, torch.float32, torch.float32)
    expected = ops.stage_combine(base, terms, coeffs, 1.0)
    out = base if alias == "base" else terms[1]
    version = out._version
    ops.stage_combine_into(base, terms, coeffs, 1.0, out)
    assert torch.equal(out, expected)
    assert out._version > version  # a graph that saved it would notice


def test_refusals():
    base, terms, coeffs = make_inputs(64, 2, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="out has shape"):
        ops.stage_combine_into(base, terms, coeffs, 1.0, torch.empty(63))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.stage_combine_into(base, terms, coeffs, 1.0, torch.empty(128)[::2])
    storage = torch.empty(65)
    with pytest.raises(RuntimeError, match="out partly overlaps base"):
        ops.stage_combine_into(storage[:64], terms, coeffs, 1.0, storage[1:])
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.stage_combine_into(base.requires_grad_(), terms, coeffs, 1.0, torch.empty(64))
    with torch.no_grad():
        ops.stage_combine_into(base, terms, coeffs, 1.0, torch.empty(64))  # fine without grad mode


def test_opcheck():
    base, terms, coeffs = make_inputs(33, 2, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.prg_fast.stage_combine_into.default, (base, terms, coeffs, 1.0, torch.empty(33)))

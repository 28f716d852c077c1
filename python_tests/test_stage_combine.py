"""The compiled CPU kernel of prg_fast::stage_combine against prg_fast.ode.reference."""
import pytest
import torch

from prg_fast.ode import ops, reference
from combine_checks import MIXED_DTYPES, make_inputs, pytorch_at_dtype as _pytorch_at_dtype, truth as _truth

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("n", [1, 7, 1023, 4096, 40961, 100003])
@pytest.mark.parametrize("n_terms", [0, 1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(n, n_terms, dtype):
    base, terms, coeffs = make_inputs(n, n_terms, dtype, dtype)
    out = ops.stage_combine(base, terms, coeffs, 0.9)
    ref = reference.stage_combine(base, terms, coeffs, 0.9)
    assert out.dtype == dtype and out.shape == base.shape
    # Kernel and reference may round in a different order (FMA, vector lanes), so both are judged
    # against the float64 truth of the same inputs: within twice PyTorch's own error at that dtype
    # (the flash-attention rule), plus one unit of rounding of the result's scale.
    truth = _truth(base, terms, coeffs, 0.9)
    ours = (out.double() - truth).abs().max().item()
    theirs = (ref.double() - truth).abs().max().item()
    theirs_at_dtype = (_pytorch_at_dtype(base, terms, coeffs, 0.9, dtype).double() - truth).abs().max().item()
    # textbook bound for a sum of n products in this precision (Higham, 2002, ch. 3)
    scale = (0.9 * base.double().abs() + sum(abs(c) * t.double().abs() for c, t in zip(coeffs, terms))).max().item()
    ulp = (len(terms) + 1) * torch.finfo(dtype).eps * scale
    assert ours <= 2 * max(theirs, theirs_at_dtype) + ulp, (ours, theirs, theirs_at_dtype)


@pytest.mark.parametrize("base_dtype,term_dtype,out_dtype", MIXED_DTYPES)
def test_mixed_dtypes_accumulate_in_float32_or_64(base_dtype, term_dtype, out_dtype):
    base, terms, coeffs = make_inputs(5003, 4, base_dtype, term_dtype)
    out = ops.stage_combine(base, terms, coeffs, 1.0, out_dtype)
    assert out.dtype == out_dtype
    ref = reference.stage_combine(base, terms, coeffs, 1.0, out_dtype)
    if out_dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # one rounding at the end: at most half an ulp from the float32 result, which may differ from the
        # reference's in its last bit (an FMA where the reference rounds the product): within one ulp of it
        ref32 = reference.stage_combine(base, terms, coeffs, 1.0, torch.float32)
        info = torch.finfo(out_dtype)
        assert bool(((out.float() - ref32).abs() <= info.eps * ref32.abs() + info.tiny).all())
        assert (out != ref).float().mean() < 0.01  # and a flip of that rounding is rare


def test_non_contiguous_inputs():
    base = torch.randn(33, 17, dtype=torch.float32).t()  # transposed view
    terms = [torch.randn(17, 66)[:, ::2], torch.randn(17, 33, 2)[..., 1]]
    out = ops.stage_combine(base, terms, [0.5, -2.0], 1.5)
    torch.testing.assert_close(out, reference.stage_combine(base, terms, [0.5, -2.0], 1.5))


def test_empty_and_high_rank():
    empty = torch.empty(0, 3)
    assert ops.stage_combine(empty, [empty], [1.0]).shape == (0, 3)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(ops.stage_combine(x, [x], [1.0]), 2 * x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_formula(dtype):
    base = torch.randn(9, dtype=dtype, requires_grad=True)
    terms = [torch.randn(9, dtype=dtype, requires_grad=True) for _ in range(3)]
    out = ops.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0)
    g = torch.randn(9, dtype=dtype)
    grads = torch.autograd.grad(out, [base] + terms, g)
    ref = reference.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0)
    ref_grads = torch.autograd.grad(ref, [base] + terms, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    base = torch.randn(6, dtype=torch.float64, requires_grad=True)
    terms = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    f = lambda b, t1, t2: ops.stage_combine(b, [t1, t2], [0.3, -1.1], 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, (base, *terms))
    assert torch.autograd.gradgradcheck(f, (base, *terms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    base = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    terms = [torch.randn(5, 7, dtype=dtype, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(torch.ops.prg_fast.stage_combine.default, (base, terms, [0.5, 0.25], 1.0, None))
    torch.library.opcheck(
        torch.ops.prg_fast.stage_combine.default, (base.detach(), [t.detach() for t in terms], [0.5, 0.25], 1.0, torch.bfloat16)
    )


def test_torch_compile_traces_the_op():
    def f(x, k):
        return ops.stage_combine(x, [k], [0.5], 1.0) * 2

    x, k = torch.randn(16), torch.randn(16)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, k), f(x, k))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.stage_combine(torch.randn(3), [torch.randn(3)], [1.0, 2.0]), "one entry per term"),
        (lambda: ops.stage_combine(torch.randn(3), [torch.randn(4)], [1.0]), r"terms\[0\] has shape"),
        (lambda: ops.stage_combine(torch.randn(3), [torch.randn(3), torch.randn(3).double()], [1.0, 1.0]), "share one dtype"),
        (lambda: ops.stage_combine(torch.arange(3), [], []), "base must be float32"),
        (lambda: ops.stage_combine(torch.randn(3), [torch.randn(3)] * 9, [1.0] * 9), "at most 8 terms"),
        (lambda: ops.stage_combine(torch.randn(3), [torch.arange(3)], [1.0]), r"terms\[0\] must be float32"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_autograd_without_terms_and_with_cast():
    """A pure cast/scale (no terms) is differentiable too: the solver uses it for the first stage
    input of a bf16 network from a float32 state."""
    x = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(ops.stage_combine(x, [], [], 2.0, torch.bfloat16).float().sum(), [x])
    torch.testing.assert_close(g, torch.full((5,), 2.0))


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (1, None, 0), (None, 0, None), (0, 1, 2)])
def test_vmap_matches_a_loop(in_dims):
    """torch.func.vmap over the operator (an ensemble of velocities via stack_module_state, or a
    vmapped solve): the batching rule stacks the vmapped dimension in front, expanding unbatched
    inputs, and equals one call per slice."""
    V, shape = 3, (4, 5)
    torch.manual_seed(0)

    def make(d):
        if d is None:
            return torch.randn(shape, dtype=torch.float64)
        full = list(shape)
        full.insert(d, V)
        return torch.randn(full, dtype=torch.float64)

    base, t1, t2 = (make(d) for d in in_dims)

    def fn(b, a, c):
        return ops.stage_combine(b, [a, c], [0.5, -1.25], 0.75, torch.float32)

    got = torch.func.vmap(fn, in_dims=in_dims)(base, t1, t2)

    def pick(t, d, v):
        return t if d is None else t.select(d, v)

    want = torch.stack([fn(*(pick(t, d, v) for t, d in zip((base, t1, t2), in_dims))) for v in range(V)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)

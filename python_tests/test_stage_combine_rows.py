"""prg_fast::stage_combine_rows (per-row coefficients) on every backend that can run here, against
prg_fast.ode.reference.stage_combine_rows, and the chaining of sums of more than 8 terms (both
operators) that prg_fast.ode.backends does for every backend.

The Triton backend runs on CPU tensors under the interpreter: TRITON_INTERPRET=1 is set at the top
of this module where no GPU is visible (as test_triton_kernels.py does). On a GPU machine the
`cuda`-marked tests run the CUDA and compiled Triton kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any import of triton or prg_fast.kernels

import pytest  # noqa: E402

from prg_fast.ode import backends, ops, reference  # noqa: E402
from combine_checks import (  # noqa: E402
    assert_rows_flash_rule,
    coeffs_for,
    make_inputs,
    make_rows_inputs,
    truth,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _available(name, device):
    return backends.unavailable_reason(name, torch.device(device)) is None


def _cases():
    cases = []
    for name in ("reference", "cpu", "triton"):
        why = backends.unavailable_reason(name, torch.device("cpu"))
        cases.append(pytest.param(name, "cpu", marks=pytest.mark.skipif(why is not None, reason=f"{name} on cpu: {why}")))
    for name in ("cuda", "triton", "reference"):
        cuda = torch.cuda.is_available()
        why = backends.unavailable_reason(name, torch.device("cuda")) if cuda else "no GPU visible"
        cases.append(
            pytest.param(
                name, "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(why is not None, reason=f"{name} on cuda: {why}")]
            )
        )
    return cases


CASES = _cases()


def _rows_fn(name, device):
    got, fn = backends.resolve_rows(name, torch.device(device))
    assert got == name
    return fn


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (5, 3, 11), (4, 1030)])
@pytest.mark.parametrize("n_terms", [0, 1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_row", [False, True])
def test_matches_reference(backend, device, shape, n_terms, dtype, one_row):
    fn = _rows_fn(backend, device)
    coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base, terms, coeffs = make_rows_inputs(shape, n_terms, dtype, dtype, 1 if one_row else shape[0], coeff_dtype, device)
    out = fn(base, terms, coeffs)
    ref = reference.stage_combine_rows(base, terms, coeffs)
    assert out.dtype == dtype and out.shape == base.shape and out.device == base.device
    assert_rows_flash_rule(out, base, terms, coeffs, ref, dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize(
    "base_dtype,term_dtype,out_dtype,coeff_dtype",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.float64, torch.float32),
        (torch.float64, torch.float32, torch.float64, torch.float32),
        (torch.float32, torch.float32, torch.float32, torch.float64),  # float64 coeffs: float64 accumulation
    ],
)
def test_mixed_dtypes(backend, device, base_dtype, term_dtype, out_dtype, coeff_dtype):
    fn = _rows_fn(backend, device)
    base, terms, coeffs = make_rows_inputs((6, 257), 4, base_dtype, term_dtype, 6, coeff_dtype, device)
    out = fn(base, terms, coeffs, out_dtype)
    assert out.dtype == out_dtype
    ref = reference.stage_combine_rows(base, terms, coeffs, out_dtype)
    if out_dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the float32 accumulation: within one unit in the last place
        ulp = torch.finfo(out_dtype).eps * ref.float().abs().clamp_min(torch.finfo(out_dtype).tiny)
        assert ((out.float() - ref.float()).abs() <= ulp).all()


def test_float64_coefficients_accumulate_in_float64():
    """float32 tensors with float64 coefficients: the result is the float64 sum rounded once,
    which float32 accumulation would not give for these cancelling values."""
    base = torch.full((2, 3), 1.0)
    terms = [torch.full((2, 3), 1.0)]
    coeffs = torch.tensor([[1e8, -1e8 + 1e-4], [1.0, 2.0]], dtype=torch.float64)
    expect = reference.stage_combine_rows(base, terms, coeffs)
    assert expect[0, 0].item() == pytest.approx(1e-4, rel=1e-3)
    for name in ("cpu", "triton"):
        if _available(name, "cpu"):
            torch.testing.assert_close(_rows_fn(name, "cpu")(base, terms, coeffs), expect)


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_inputs(backend, device):
    fn = _rows_fn(backend, device)
    base = torch.randn(17, 33, device=device).t()  # (33, 17) transposed view
    terms = [torch.randn(33, 34, device=device)[:, ::2], torch.randn(33, 17, 2, device=device)[..., 1]]
    coeffs = torch.randn(3, 33, dtype=torch.float64, device=device).t()  # (33, 3), non-contiguous
    out = fn(base, terms, coeffs)
    torch.testing.assert_close(out, reference.stage_combine_rows(base, terms, coeffs))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty(backend, device):
    fn = _rows_fn(backend, device)
    empty = torch.empty(0, 3, device=device)
    assert fn(empty, [empty], torch.ones(1, 2, device=device)).shape == (0, 3)
    x = torch.empty(4, 0, device=device)
    assert fn(x, [], torch.ones(4, 1, device=device)).shape == (4, 0)


# -- more than 8 terms: chained in prg_fast.ode.backends, for every backend ------------------------


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n_terms", [9, 13, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_long_sums_rows(backend, device, n_terms, dtype):
    fn = _rows_fn(backend, device)
    for rows in (5, 1):
        base, terms, coeffs = make_rows_inputs((5, 37), n_terms, dtype, dtype, rows, torch.float64, device)
        out = fn(base, terms, coeffs)
        ref = reference.stage_combine_rows(base, terms, coeffs)
        assert out.dtype == dtype
        assert_rows_flash_rule(out, base, terms, coeffs, ref, dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n_terms", [9, 13, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_long_sums_scalar_coefficients(backend, device, n_terms, dtype):
    name, fn = backends.resolve(backend, torch.device(device))
    assert name == backend
    base, terms, coeffs = make_inputs((3, 41), n_terms, dtype, dtype, device)
    out = fn(base, terms, coeffs, 0.7)
    ref = reference.stage_combine(base, terms, coeffs, 0.7)
    assert out.dtype == dtype
    exact = truth(base, terms, coeffs, 0.7)
    ours = (out.double() - exact).abs().max().item()
    theirs = (ref.double() - exact).abs().max().item()
    scale = (0.7 * base.double().abs() + sum(abs(c) * t.double().abs() for c, t in zip(coeffs, terms))).max().item()
    assert ours <= 2 * theirs + (n_terms + 1) * torch.finfo(dtype).eps * scale, (ours, theirs)


@pytest.mark.parametrize("backend,device", CASES)
def test_long_sums_gradients(backend, device):
    fn = _rows_fn(backend, device)
    base, terms, coeffs = make_rows_inputs((3, 4), 13, torch.float64, torch.float64, 3, torch.float64, device)
    leaves = [base.requires_grad_(), *[t.requires_grad_() for t in terms], coeffs.requires_grad_()]
    g = torch.randn(3, 4, dtype=torch.float64, device=device)
    got = torch.autograd.grad(fn(base, terms, coeffs), leaves, g)
    want = torch.autograd.grad(reference.stage_combine_rows(base, terms, coeffs), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# -- gradients, with respect to coeffs too -------------------------------------------------------


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("rows", [4, 1])
def test_gradcheck_float64(backend, device, rows):
    fn = _rows_fn(backend, device)
    base, terms, coeffs = make_rows_inputs((4, 3), 2, torch.float64, torch.float64, rows, torch.float64, device)
    args = (base.requires_grad_(), terms[0].requires_grad_(), terms[1].requires_grad_(), coeffs.requires_grad_())
    f = lambda b, t1, t2, c: fn(b, [t1, t2], c)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(backend, device, dtype):
    fn = _rows_fn(backend, device)
    base, terms, coeffs = make_rows_inputs((5, 9), 3, torch.float32, dtype, 5, torch.float32, device)
    leaves = [base.requires_grad_(), *[t.requires_grad_() for t in terms], coeffs.requires_grad_()]
    g = torch.randn(5, 9, device=device)
    got = torch.autograd.grad(fn(base, terms, coeffs).float(), leaves, g)
    want = torch.autograd.grad(reference.stage_combine_rows(base, terms, coeffs).float(), leaves, g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_coefficient_gradient_is_the_row_sum():
    """d/dcoeffs[r, 0] = sum over row r of grad * base, d/dcoeffs[r, j+1] = sum of grad * terms[j];
    with one row, summed over every row."""
    if not ops.HAS_OPS:
        pytest.skip(f"compiled ops not built: {ops.CPU_ERROR}")
    base, terms, coeffs = make_rows_inputs((3, 2, 2), 2, torch.float64, torch.float64, 3)
    g = torch.randn(3, 2, 2, dtype=torch.float64)
    for c in (coeffs, coeffs[:1]):
        c = c.clone().requires_grad_()
        (gc,) = torch.autograd.grad(ops.stage_combine_rows(base, terms, c), [c], g)
        per_row = torch.stack([(g * x).sum((1, 2)) for x in [base] + terms], 1)
        torch.testing.assert_close(gc, per_row if c.shape[0] == 3 else per_row.sum(0, keepdim=True))


def test_time_gradient_through_coefficients():
    """A per-sample step size h computed from times: x + h * k differentiated w.r.t. the times."""
    if not ops.HAS_OPS:
        pytest.skip(f"compiled ops not built: {ops.CPU_ERROR}")
    t = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
    x, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    h = (1.0 - t) / 4
    out = ops.stage_combine_rows(x, [k], torch.stack([torch.ones_like(h), h], 1))
    (gt,) = torch.autograd.grad(out.sum(), [t])
    torch.testing.assert_close(gt, -k.sum(1) / 4)


# -- the operator: opcheck, torch.compile, errors -------------------------------------------------


@pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [5, 1])
def test_opcheck(dtype, rows):
    base = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    terms = [torch.randn(5, 7, dtype=dtype, requires_grad=True) for _ in range(2)]
    coeffs = torch.randn(rows, 3, dtype=dtype, requires_grad=True)
    op = torch.ops.prg_fast.stage_combine_rows.default
    torch.library.opcheck(op, (base, terms, coeffs, None))
    torch.library.opcheck(op, (base.detach(), [t.detach() for t in terms], coeffs.detach(), torch.bfloat16))
    torch.library.opcheck(op, (base, [], coeffs[:, :1], None))


def test_opcheck_triton():
    if not _available("triton", "cpu"):
        pytest.skip(f"triton on cpu: {backends.unavailable_reason('triton', torch.device('cpu'))}")
    _rows_fn("triton", "cpu")  # imports the module, registering the operator
    base = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    terms = [torch.randn(5, 7, dtype=torch.float64, requires_grad=True)]
    coeffs = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.prg_fast.stage_combine_rows_triton.default, (base, terms, coeffs, None))


@pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")
def test_torch_compile_traces_the_op():
    def f(x, k, c):
        return ops.stage_combine_rows(x, [k], c) * 2

    x, k, c = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 2)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x, k, c), f(x, k, c))


def _cpu_kernel_backends():
    return [n for n in ("cpu", "triton") if _available(n, "cpu")]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(3, 2), [torch.randn(3, 2)], torch.randn(3, 3)), r"coeffs must have shape \(B, 1 \+ len\(terms\)\)"),
        (lambda: (torch.randn(3, 2), [torch.randn(3, 2)], torch.randn(2, 2)), r"B = base.size\(0\) = 3"),
        (lambda: (torch.randn(3, 2), [torch.randn(3, 2)], torch.randn(6)), r"got \[6\]"),
        (lambda: (torch.randn(3, 2), [torch.randn(3, 2)], torch.randn(3, 2).half()), "coeffs must be float32 or float64"),
        (lambda: (torch.randn(3, 2), [torch.randn(3, 2)], torch.ones(3, 2, dtype=torch.int64)), "coeffs must be float32 or float64"),
        (lambda: (torch.tensor(1.0), [], torch.randn(1, 1)), "batch"),
        (lambda: (torch.randn(3, 2), [torch.randn(4, 2)], torch.randn(3, 2)), r"terms\[0\] has shape"),
        (lambda: (torch.arange(3.0).long(), [], torch.randn(3, 1)), "base must be float32"),
    ],
)
def test_bad_inputs(make, match):
    names = _cpu_kernel_backends()
    if not names:
        pytest.skip("no compiled CPU kernel (cpu, or triton under the interpreter) here")
    for name in names:
        fn = _rows_fn(name, "cpu")
        base, terms, coeffs = make()
        with pytest.raises(RuntimeError, match=match):
            fn(base, terms, coeffs)


def test_too_many_terms_for_one_kernel_call():
    if not ops.HAS_OPS:
        pytest.skip(f"compiled ops not built: {ops.CPU_ERROR}")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="at most 8 terms"):
        ops.stage_combine_rows(x, [x] * 9, torch.randn(2, 10))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_coeffs_on_another_device(backend):
    if not torch.cuda.is_available() or not _available(backend, "cuda"):
        pytest.skip(f"{backend} on cuda unavailable here")
    fn = _rows_fn(backend, "cuda")
    x = torch.randn(3, 2, device="cuda")
    with pytest.raises(RuntimeError, match="coeffs is on cpu but base is on cuda"):
        fn(x, [x], torch.randn(3, 2))


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("coeff_dim", [None, 0, 1])
@pytest.mark.parametrize("one_row", [False, True])
@pytest.mark.parametrize("base_dim", [0, 1, None])
def test_vmap_matches_a_loop(backend, device, coeff_dim, one_row, base_dim):
    """torch.func.vmap over the per-row operator: rows stay each slice's own dim 0, coefficients
    per slice and row (batched or shared, one row or B rows), equal to one call per slice."""
    fn = _rows_fn(backend, device)
    V, B, R = 3, 4, 1 if one_row else 4
    torch.manual_seed(0)
    base = torch.randn((V, B, 6) if base_dim == 0 else (B, V, 6) if base_dim == 1 else (B, 6), device=device)
    term = torch.randn(V, B, 6, device=device)
    coeffs = torch.randn((R, 2) if coeff_dim is None else (V, R, 2) if coeff_dim == 0 else (R, V, 2),
                         dtype=torch.float64, device=device)
    in_dims = (base_dim, 0, coeff_dim)

    def call(b, t, c):
        return fn(b, [t], c, torch.float32)

    got = torch.func.vmap(call, in_dims=in_dims)(base, term, coeffs)

    def pick(t, d, v):
        return t if d is None else t.select(d, v)

    want = torch.stack([call(pick(base, base_dim, v), term[v], pick(coeffs, coeff_dim, v)) for v in range(V)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)

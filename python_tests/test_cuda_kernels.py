"""The CUDA kernel of prg_fast::stage_combine against prg_fast.ode.reference, and reverse() with
backend="cuda" against backend="reference". Runs on a machine with a CUDA GPU and the CUDA ops built
(`pytest -m cuda`); everywhere else every test here is skipped with the reason."""
import itertools

import pytest
import torch

import prg_fast
from prg_fast.ode import ops, reference
from prg_fast.ode.solvers import SOLVERS
from combine_checks import MIXED_DTYPES, pytorch_at_dtype as _pytorch_at_dtype, truth as _truth
from gradient_checks import grads, rel_err


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if ops.CUDA_ERROR:
        return f"needs a CUDA GPU and prg_fast's CUDA ops: {ops.CUDA_ERROR}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, (1 << 20) + 3]


def _coeffs(n_terms):
    return [0.37 * (j + 1) * (-1) ** j for j in range(n_terms)]


def _inputs(shape, n_terms, base_dtype, term_dtype):
    base = torch.randn(shape, dtype=torch.float64, device=DEV).to(base_dtype)
    terms = [torch.randn(shape, dtype=torch.float64, device=DEV).to(term_dtype) for _ in range(n_terms)]
    return base, terms, _coeffs(n_terms)






def _max_err(x, truth):
    return (x.double() - truth).abs().max().item() if truth.numel() else 0.0


def assert_combine_ok(out, base, terms, coeffs, alpha=1.0, out_dtype=None):
    """The flash-attention rule: the kernel's error against the float64 truth is at most twice the
    error of the same arithmetic done by PyTorch (at the output dtype, or the reference's float32/64
    accumulation, whichever is worse), plus a few units of rounding of the accumulator at the
    result's scale (the kernel may fuse multiply-adds and rounds float coefficients once)."""
    out_dtype = base.dtype if out_dtype is None else out_dtype
    assert out.dtype == out_dtype, (out.dtype, out_dtype)
    assert out.shape == base.shape and out.device == base.device
    assert out.is_contiguous()
    truth = _truth(base, terms, coeffs, alpha)
    ours = _max_err(out, truth)
    theirs = _max_err(reference.stage_combine(base, terms, coeffs, alpha, out_dtype), truth)
    at_dtype = _max_err(_pytorch_at_dtype(base, terms, coeffs, alpha, out_dtype), truth)
    acc = reference.accumulate_dtype(base, terms, out_dtype)
    scale = abs(alpha) * base.double().abs()
    for c, t in zip(coeffs, terms):
        scale = scale + abs(c) * t.double().abs()
    scale = scale.max().item() if scale.numel() else 0.0
    tiny = (len(terms) + 2) * torch.finfo(acc).eps * scale
    assert ours <= 2 * max(theirs, at_dtype) + tiny, (ours, theirs, at_dtype, tiny)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Comparisons below assume full float32 matmuls and convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("n_terms", range(9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(n, n_terms, dtype):
    base, terms, coeffs = _inputs((n,), n_terms, dtype, dtype)
    out = ops.stage_combine(base, terms, coeffs, 0.9)
    assert_combine_ok(out, base, terms, coeffs, 0.9)


@pytest.mark.parametrize(
    "base_dtype,term_dtype,out_dtype", list(itertools.product(DTYPES, DTYPES, DTYPES)),
    ids=lambda d: str(d).replace("torch.", ""),
)
def test_every_dtype_mix(base_dtype, term_dtype, out_dtype):
    """All 64 (base, terms, out) dtype mixes, each kernel instantiation with both a vector body
    and a scalar tail (4099 = 512 * 8 + 3)."""
    base, terms, coeffs = _inputs((4099,), 3, base_dtype, term_dtype)
    out = ops.stage_combine(base, terms, coeffs, -1.25, out_dtype)
    assert_combine_ok(out, base, terms, coeffs, -1.25, out_dtype)


@pytest.mark.parametrize("base_dtype,term_dtype,out_dtype", MIXED_DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_mixed_dtypes(base_dtype, term_dtype, out_dtype, n):
    base, terms, coeffs = _inputs((n,), 4, base_dtype, term_dtype)
    out = ops.stage_combine(base, terms, coeffs, 1.0, out_dtype)
    assert_combine_ok(out, base, terms, coeffs, 1.0, out_dtype)
    if out_dtype in (torch.float32, torch.float64):
        ref = reference.stage_combine(base, terms, coeffs, 1.0, out_dtype)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float32_accumulation_for_half_inputs():
    """bf16 in, bf16 out, but the sum is formed in float32: large terms that cancel leave a small
    value that bf16 arithmetic would have lost."""
    base = torch.full((1000,), 256.0, device=DEV, dtype=torch.bfloat16)
    terms = [torch.full((1000,), 1.0, device=DEV, dtype=torch.bfloat16)] * 2
    out = ops.stage_combine(base, terms, [1.0, -1.0 + 2**-7], 1.0)
    # float32: 256 + 1 - 0.9921875 = 256.0078125 -> bf16 256. Summed in bf16 it would be
    # 256 + 1 -> 256 (ties to even), then 256 - 0.9921875 -> 255.
    torch.testing.assert_close(out.float(), torch.full((1000,), 256.0, device=DEV))
    out = ops.stage_combine(base, terms, [1.0, -1.0], -1.0, torch.float32)
    torch.testing.assert_close(out, torch.full((1000,), -256.0, device=DEV), rtol=0, atol=0)


def test_large_values_and_special_numbers():
    base = torch.tensor([float("inf"), float("nan"), 1e38, -0.0, 3e-45], device=DEV)
    terms = [torch.tensor([1.0, 1.0, 1e38, 0.0, 0.0], device=DEV)]
    out = ops.stage_combine(base, terms, [2.0], 1.0)
    ref = reference.stage_combine(base, terms, [2.0], 1.0)
    torch.testing.assert_close(out, ref, equal_nan=True)
    out16 = ops.stage_combine(base, terms, [2.0], 1.0, torch.float16)  # overflow to inf in fp16
    torch.testing.assert_close(out16, ref.half(), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Layouts: misaligned and non-contiguous views (scalar fallback) and mixes of aligned inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", [(1, 0, 0), (0, 1, 0), (0, 0, 3), (1, 1, 1), (2, 2, 2), (4, 8, 12)])
@pytest.mark.parametrize("n", [7, 1023, (1 << 20) + 3])
def test_misaligned_views(dtype, offsets, n):
    """Views that start 1..12 elements into their storage: the pointers are aligned to less than
    16 bytes (or by chance to 16), so both the vectorised and the scalar paths are exercised."""
    def view(offset):
        return torch.randn(n + offset, dtype=torch.float64, device=DEV).to(dtype)[offset:]

    base = view(offsets[0])
    terms = [view(offsets[1]), view(offsets[2]), view(offsets[1])]
    coeffs = _coeffs(3)
    out = ops.stage_combine(base, terms, coeffs, 0.5)
    assert_combine_ok(out, base, terms, coeffs, 0.5)
    out = ops.stage_combine(base, terms, coeffs, 0.5, torch.float32)
    assert_combine_ok(out, base, terms, coeffs, 0.5, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    base = torch.randn(33, 17, device=DEV).to(dtype).t()  # transposed view
    terms = [
        torch.randn(17, 66, device=DEV).to(dtype)[:, ::2],  # strided
        torch.randn(17, 33, 2, device=DEV).to(dtype)[..., 1],  # last-dim slice
        torch.randn(1, 33, device=DEV).to(dtype).expand(17, 33),  # broadcast (stride 0)
    ]
    coeffs = [0.5, -2.0, 0.25]
    out = ops.stage_combine(base, terms, coeffs, 1.5)
    assert out.shape == (17, 33)
    assert_combine_ok(out, base, terms, coeffs, 1.5)


def test_same_tensor_as_base_and_term():
    x = torch.randn(1 << 12, device=DEV)
    torch.testing.assert_close(ops.stage_combine(x, [x, x], [1.0, 1.0]), 3 * x)


def test_empty_scalar_and_high_rank():
    empty = torch.empty(0, 3, device=DEV)
    out = ops.stage_combine(empty, [empty], [1.0])
    assert out.shape == (0, 3) and out.device.type == "cuda"
    s = torch.tensor(2.0, device=DEV)
    torch.testing.assert_close(ops.stage_combine(s, [s], [0.5], 2.0), torch.tensor(5.0, device=DEV))
    x = torch.randn(2, 3, 4, 5, device=DEV)
    torch.testing.assert_close(ops.stage_combine(x, [x], [1.0]), 2 * x)


def test_large_tensor_int64_safe_indexing():
    """Past 2^31 bytes (2^29 + 5 float32 elements = 2 GiB + 20 B per tensor): indices and byte
    offsets overflow 32 bits if the kernel used int."""
    n = (1 << 29) + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n * 4 + (1 << 30):
        pytest.skip("not enough GPU memory for three 2 GiB tensors")
    base = torch.ones(n, device=DEV)
    term = torch.full((n,), 2.0, device=DEV)
    out = ops.stage_combine(base, [term], [0.5], 3.0)
    assert out[0].item() == 4.0 and out[-1].item() == 4.0 and out[n // 2 + 7].item() == 4.0
    assert bool((out == 4.0).all())
    del base, term, out
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Streams, devices, errors


def test_runs_on_the_current_stream():
    x = torch.randn(1 << 20, device=DEV)
    k = torch.randn(1 << 20, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = x * 2  # queued on s, consumed by the kernel on s
        out = ops.stage_combine(y, [k], [0.5], 1.0)
    s.synchronize()
    torch.testing.assert_close(out, 2 * x + 0.5 * k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device():
    x = torch.randn(4099, device="cuda:1")
    k = torch.randn(4099, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.stage_combine(x, [k], [0.5], 2.0)
    assert out.device == x.device
    torch.testing.assert_close(out, 2 * x + 0.5 * k)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [torch.randn(3, device=DEV)], [1.0, 2.0]), "one entry per term"),
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [torch.randn(4, device=DEV)], [1.0]), r"terms\[0\] has shape"),
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [torch.randn(3)], [1.0]), r"terms\[0\] is on cpu"),
        (
            lambda: ops.stage_combine(
                torch.randn(3, device=DEV), [torch.randn(3, device=DEV), torch.randn(3, device=DEV).double()], [1.0, 1.0]
            ),
            "share one dtype",
        ),
        (lambda: ops.stage_combine(torch.arange(3, device=DEV), [], []), "base must be float32"),
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [torch.randn(3, device=DEV)] * 9, [1.0] * 9), "at most 8 terms"),
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [torch.arange(3, device=DEV)], [1.0]), r"terms\[0\] must be float32"),
        (lambda: ops.stage_combine(torch.randn(3, device=DEV), [], [], 1.0, torch.int32), "out_dtype must be"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# torch.library integration and autograd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    base = torch.randn(5, 7, dtype=dtype, device=DEV, requires_grad=True)
    terms = [torch.randn(5, 7, dtype=dtype, device=DEV, requires_grad=True) for _ in range(2)]
    op = torch.ops.prg_fast.stage_combine.default
    torch.library.opcheck(op, (base, terms, [0.5, 0.25], 1.0, None))
    torch.library.opcheck(op, (base.detach(), [t.detach() for t in terms], [0.5, 0.25], 1.0, torch.bfloat16))
    torch.library.opcheck(op, (base.detach(), [], [], -2.0, None))


def test_opcheck_mixed_dtypes():
    base = torch.randn(4, 9, device=DEV, requires_grad=True)
    terms = [torch.randn(4, 9, device=DEV).bfloat16().requires_grad_() for _ in range(3)]
    torch.library.opcheck(torch.ops.prg_fast.stage_combine.default, (base, terms, [0.5, 0.25, -1.0], 0.75, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_formula(dtype):
    base = torch.randn(9, dtype=dtype, device=DEV, requires_grad=True)
    terms = [torch.randn(9, dtype=dtype, device=DEV, requires_grad=True) for _ in range(3)]
    out = ops.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0)
    g = torch.randn(9, dtype=dtype, device=DEV)
    grads = torch.autograd.grad(out, [base] + terms, g)
    ref = reference.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0)
    ref_grads = torch.autograd.grad(ref, [base] + terms, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_autograd_without_terms(out_dtype):
    """A bare scaled cast (no terms), as the solver uses to hand a float32 state to a bf16 network."""
    x = torch.randn(33, device=DEV, requires_grad=True)
    out = ops.stage_combine(x, [], [], 2.0, out_dtype)
    (g,) = torch.autograd.grad(out.float().sum(), [x])
    torch.testing.assert_close(g, torch.full_like(x, 2.0))


def test_gradcheck_float64():
    base = torch.randn(6, dtype=torch.float64, device=DEV, requires_grad=True)
    terms = [torch.randn(6, dtype=torch.float64, device=DEV, requires_grad=True) for _ in range(2)]
    f = lambda b, t1, t2: ops.stage_combine(b, [t1, t2], [0.3, -1.1], 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, (base, *terms))


def test_torch_compile_traces_the_op():
    def f(x, k):
        return ops.stage_combine(x, [k], [0.5], 1.0) * 2

    x, k = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, k), f(x, k))


# ---------------------------------------------------------------------------------------------
# The solver on the CUDA backend


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_reverse_cuda_matches_reference(mlp, method, dtype, tol):
    model = mlp(dim=5).to(device=DEV, dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype, device=DEV, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=6, method=method)
    ref = prg_fast.reverse(model, x, adjoint=False, backend="reference", **kw)
    ref_grads = grads(ref, inputs)
    for adjoint in (True, False):
        out = prg_fast.reverse(model, x, adjoint=adjoint, backend="cuda", **kw)
        assert out.device.type == "cuda" and out.dtype == dtype
        assert rel_err(out, ref) < tol
        for a, b in zip(grads(out, inputs), ref_grads):
            assert rel_err(a, b) < tol


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_reverse_cuda_adjoint_equals_backprop(conv, method):
    model = conv(channels=3).to(DEV)
    x = torch.randn(2, 3, 8, 8, device=DEV, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=4, method=method, backend="cuda", save_at=[0.5, 1.0])
    out_adj = prg_fast.reverse(model, x, adjoint=True, **kw)
    out_bp = prg_fast.reverse(model, x, adjoint=False, **kw)
    torch.testing.assert_close(out_adj, out_bp, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(out_adj, inputs), grads(out_bp, inputs)):
        assert rel_err(a, b) < 1e-4


def test_reverse_cuda_bf16_network(mlp):
    """A bf16 network with a float32 state: the kernel writes the network input in bf16."""
    model = mlp(dim=8, hidden=64).to(DEV).bfloat16()
    x = torch.randn(16, 8, device=DEV, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=4, method="rk4")
    ref = prg_fast.reverse(model, x, adjoint=False, backend="reference", **kw)
    for adjoint in (True, False):
        out = prg_fast.reverse(model, x, adjoint=adjoint, backend="cuda", **kw)
        assert out.dtype == torch.float32
        assert rel_err(out, ref) < 2e-2
        for a, b in zip(grads(out, inputs), grads(ref, inputs)):
            assert rel_err(a, b) < 5e-2


def test_auto_backend_picks_cuda():
    from prg_fast.ode import backends

    name, _ = backends.resolve("auto", torch.device(DEV))
    assert name == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])  # an out at an odd offset takes the scalar path
def test_into_equals_the_functional_op(dtype, offset):
    base = torch.randn(4099, device=DEV).to(dtype)
    terms = [torch.randn(4099, device=DEV).to(dtype) for _ in range(3)]
    coeffs = [0.5, -0.25, 0.125]
    out = torch.empty(4099 + offset, device=DEV, dtype=dtype)[offset:]
    ops.stage_combine_into(base, terms, coeffs, 0.9, out)
    assert torch.equal(out, ops.stage_combine(base, terms, coeffs, 0.9))
    expected = ops.stage_combine(base, terms, coeffs, 1.0)
    ops.stage_combine_into(base, terms, coeffs, 1.0, base)  # in place
    assert torch.equal(base, expected)


def test_no_grad_reverse_with_reused_buffers_matches_the_reference():
    torch.manual_seed(0)
    x = torch.randn(8, 16, device=DEV)
    with torch.no_grad():
        for velocity in (lambda t, y: y, lambda t, y: torch.tanh(y) - 0.3 * y):
            ours = prg_fast.reverse(velocity, x, steps=5, method="rk4", backend="cuda", save_at=[0.4, 1.0])
            ref = prg_fast.reverse(velocity, x, steps=5, method="rk4", backend="reference", save_at=[0.4, 1.0])
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

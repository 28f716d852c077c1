"""The Triton backend (prg_fast.kernels.stage_combine, operator prg_fast::stage_combine_triton)
against prg_fast.ode.reference, on the CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton (and with it prg_fast.kernels) is first imported, so
it is set at the top of this module -- only where no GPU is visible: on a GPU machine the
compiled kernels are tested on CUDA tensors by test_triton_cuda.py (pytest -m cuda) and this
module skips. The interpreter is slow: sizes are small.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any import of triton or prg_fast.kernels

import importlib.util  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import prg_fast  # noqa: E402
from prg_fast.ode import backends, reference  # noqa: E402
from combine_checks import pytorch_at_dtype as _pytorch_at_dtype, truth as _truth  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed (pip install triton)", allow_module_level=True)

# Triton and the kernel module are imported by the first test, not at collection: importing them
# (with torch._dynamo / torch._inductor, which triton_op pulls in) grows the pytest process by
# ~150 MB, and subprocess-based memory tests of other modules inherit the parent's peak RSS.
tk = None
OP = None


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    global tk, OP
    from prg_fast.kernels import stage_combine as module

    if module.IMPORT_ERROR:
        pytest.skip(f"Triton kernels unavailable: {module.IMPORT_ERROR}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the compiled Triton kernels are tested by test_triton_cuda.py")
    if not module.INTERPRETED:
        pytest.skip(
            "prg_fast.kernels was imported before TRITON_INTERPRET=1 was set (by another test "
            "module?); run this file on its own"
        )
    tk, OP = module, torch.ops.prg_fast.stage_combine_triton.default
    yield


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]






def _inputs(n, n_terms, base_dtype, term_dtype, shape=None):
    shape = shape or (n,)
    base = torch.randn(shape, dtype=torch.float64).to(base_dtype)
    terms = [torch.randn(shape, dtype=torch.float64).to(term_dtype) for _ in range(n_terms)]
    coeffs = [0.37 * (j + 1) * (-1) ** j for j in range(n_terms)]
    return base, terms, coeffs


def _assert_flash_rule(out, base, terms, coeffs, alpha, dtype):
    """Low precision: the kernel's error against the float64 truth is at most twice the error of
    the same arithmetic done by PyTorch at `dtype` (or of the reference), plus one rounding of
    the result's scale."""
    truth = _truth(base, terms, coeffs, alpha)
    ref = reference.stage_combine(base, terms, coeffs, alpha, out.dtype)
    ours = (out.double() - truth).abs().max().item()
    theirs = (ref.double() - truth).abs().max().item()
    at_dtype = (_pytorch_at_dtype(base, terms, coeffs, alpha, dtype).double() - truth).abs().max().item()
    scale = (abs(alpha) * base.double().abs() + sum(abs(c) * t.double().abs() for c, t in zip(coeffs, terms))).max().item()
    ulp = torch.finfo(dtype).eps * scale
    assert ours <= 2 * max(theirs, at_dtype) + ulp, (ours, theirs, at_dtype)


def _assert_one_rounding(out, ref):
    """A 16-bit result is the float32 accumulation rounded once: within one unit in the last
    place of the reference (equal under the interpreter; FMA on a GPU may move a tie)."""
    ulp = torch.finfo(out.dtype).eps * ref.float().abs().clamp_min(torch.finfo(out.dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= ulp).all()


# -- the kernel against the reference ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1023, 4097])
@pytest.mark.parametrize("n_terms", [0, 1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(n, n_terms, dtype):
    base, terms, coeffs = _inputs(n, n_terms, dtype, dtype)
    out = tk.stage_combine(base, terms, coeffs, 0.9)
    ref = reference.stage_combine(base, terms, coeffs, 0.9)
    assert out.dtype == dtype and out.shape == base.shape and out.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    elif dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    else:
        _assert_flash_rule(out, base, terms, coeffs, 0.9, dtype)
        _assert_one_rounding(out, ref)


@pytest.mark.parametrize(
    "base_dtype,term_dtype,out_dtype",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),  # stage input for a bf16 network
        (torch.float32, torch.bfloat16, torch.float32),  # final combination, float32 state
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.float16, torch.float16),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float32, torch.float64),  # float64 accumulation from float32 inputs
        (torch.float64, torch.float32, torch.float64),
        (torch.float64, torch.bfloat16, torch.bfloat16),  # float64 accumulation, bf16 out
        (torch.bfloat16, torch.bfloat16, torch.float64),
        (torch.float64, torch.float64, torch.float16),
    ],
)
def test_mixed_dtypes(base_dtype, term_dtype, out_dtype):
    base, terms, coeffs = _inputs(1500, 4, base_dtype, term_dtype)
    out = tk.stage_combine(base, terms, coeffs, 1.0, out_dtype)
    ref = reference.stage_combine(base, terms, coeffs, 1.0, out_dtype)
    assert out.dtype == out_dtype
    if out_dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    elif out_dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        _assert_one_rounding(out, ref)
        _assert_flash_rule(out, base, terms, coeffs, 1.0, out_dtype)


def test_float64_coefficients_are_not_rounded_to_float32():
    """Triton hands Python floats to kernels as float32; the kernel rebuilds float64 coefficients
    from three float32 parts, so float64 results equal the reference bit for bit here."""
    rng = random.Random(0)
    base, terms, _ = _inputs(37, 8, torch.float64, torch.float64)
    for _ in range(5):
        coeffs = [rng.uniform(-3, 3) * 10.0 ** rng.randint(-9, 4) for _ in range(8)]
        alpha = rng.uniform(-2, 2)
        assert torch.equal(tk.stage_combine(base, terms, coeffs, alpha), reference.stage_combine(base, terms, coeffs, alpha))
    for _ in range(1000):
        c = rng.uniform(-1, 1) * 10.0 ** rng.randint(-20, 30)  # exact for 2**-77 <= |c| < 2**128
        hi, mid, lo = tk.split_coefficient(c)
        assert (hi + mid) + lo == c
        assert hi == struct.unpack("f", struct.pack("f", c))[0]
        assert all(struct.unpack("f", struct.pack("f", p))[0] == p for p in (hi, mid, lo))
    assert tk.split_coefficient(math.inf) == (math.inf, 0.0, 0.0)


@pytest.mark.parametrize("alpha", [1.0, 0.0, -2.5, 1e-3])
def test_alpha(alpha):
    base, terms, coeffs = _inputs(7, 2, torch.float32, torch.float32)
    torch.testing.assert_close(tk.stage_combine(base, terms, coeffs, alpha), reference.stage_combine(base, terms, coeffs, alpha))


def test_non_contiguous_inputs():
    base = torch.randn(33, 17).t()  # transposed view
    terms = [
        torch.randn(17, 66)[:, ::2],  # strided
        torch.randn(17, 33, 2)[..., 1],  # inner stride 2
        torch.randn(1, 33).expand(17, 33),  # stride 0
        torch.randn(40, 50)[3:20, 5:38],  # offset slice
    ]
    coeffs = [0.5, -2.0, 0.25, 1.5]
    assert not base.is_contiguous() and not any(t.is_contiguous() for t in terms)
    out = tk.stage_combine(base, terms, coeffs, 1.5)
    assert out.shape == (17, 33) and out.is_contiguous()
    torch.testing.assert_close(out, reference.stage_combine(base, terms, coeffs, 1.5), rtol=1e-6, atol=1e-6)
    bf = [t.to(torch.bfloat16) for t in terms]
    out = tk.stage_combine(base, bf, coeffs, 1.5, torch.bfloat16)
    _assert_one_rounding(out, reference.stage_combine(base, bf, coeffs, 1.5, torch.bfloat16))


def test_empty_and_high_rank():
    empty = torch.empty(0, 3)
    assert tk.stage_combine(empty, [empty], [1.0]).shape == (0, 3)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(tk.stage_combine(x, [x], [1.0]), 2 * x)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_special_values_and_bfloat16_rounding():
    # ties, NaN, infinities, overflow to inf, subnormals: float32 -> bfloat16 must round to
    # nearest even like PyTorch (the interpreter's own cast truncates)
    x = torch.tensor(
        [math.nan, math.inf, -math.inf, 3.4e38, 1e-40, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20), 65519.0]
    )
    out = tk.stage_combine(x, [], [], 1.0, torch.bfloat16)
    ref = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
    assert torch.equal(tk.stage_combine(x, [], [], 1.0, torch.float16)[1:], x[1:].half())


def test_more_than_eight_terms_are_chained():
    # The chaining lives in prg_fast.ode.backends (one place for every backend).
    _, combine = backends.resolve("triton", torch.device("cpu"))
    base, terms, coeffs = _inputs(50, 13, torch.float32, torch.bfloat16)
    out = combine(base, terms, coeffs, 0.5, torch.bfloat16)
    _assert_one_rounding(out, reference.stage_combine(base, terms, coeffs, 0.5, torch.bfloat16))
    base, terms, coeffs = _inputs(50, 17, torch.float64, torch.float64)
    torch.testing.assert_close(combine(base, terms, coeffs, 0.5), reference.stage_combine(base, terms, coeffs, 0.5))
    with pytest.raises(RuntimeError, match="at most 8 terms"):
        OP(base, terms[:9], coeffs[:9], 1.0, None)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: tk.stage_combine(torch.randn(3), [torch.randn(3)], [1.0, 2.0]), "one entry per term"),
        (lambda: tk.stage_combine(torch.randn(3), [torch.randn(4)], [1.0]), r"terms\[0\] has shape"),
        (lambda: tk.stage_combine(torch.randn(3), [torch.randn(3), torch.randn(3).double()], [1.0, 1.0]), "share one dtype"),
        (lambda: tk.stage_combine(torch.arange(3), [], []), "base must be float32"),
        (lambda: tk.stage_combine(torch.randn(3), [torch.arange(3)], [1.0]), r"terms\[0\] must be float32"),
        (lambda: tk.stage_combine(torch.randn(3), [], [], 1.0, torch.int32), "out_dtype must be float32"),
        (lambda: OP(torch.randn(3), [torch.randn(3)] * 9, [1.0] * 9, 1.0, None), "at most 8 terms"),
        (lambda: tk.stage_combine(torch.randn(3), [torch.randn(3)], [1e300]), "outside the float32 range"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# -- the operator: autograd, fake kernel, torch.compile ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_formula(dtype):
    base = torch.randn(9, dtype=dtype, requires_grad=True)
    terms = [torch.randn(9, dtype=dtype, requires_grad=True) for _ in range(3)]
    g = torch.randn(9, dtype=dtype)
    grads = torch.autograd.grad(tk.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0), [base] + terms, g)
    ref_grads = torch.autograd.grad(reference.stage_combine(base, terms, [0.1, 0.2, -0.3], 2.0), [base] + terms, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    base = torch.randn(6, dtype=torch.float64, requires_grad=True)
    terms = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    f = lambda b, t1, t2: tk.stage_combine(b, [t1, t2], [0.3, -1.1], 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, (base, *terms))
    assert torch.autograd.gradgradcheck(f, (base, *terms))


def test_schema_matches_the_cpp_operator():
    schema = str(OP._schema)
    assert schema.startswith("prg_fast::stage_combine_triton(Tensor base, Tensor[] terms, float[] coeffs, float alpha=1")
    assert schema.endswith("ScalarType? out_dtype=None) -> Tensor")
    if hasattr(torch.ops.prg_fast, "stage_combine"):
        cpp = str(torch.ops.prg_fast.stage_combine.default._schema)
        assert schema.split("(", 1)[1] == cpp.split("(", 1)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    base = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    terms = [torch.randn(5, 7, dtype=dtype, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(OP, (base, terms, [0.5, 0.25], 1.0, None))
    torch.library.opcheck(OP, (base.detach(), [t.detach() for t in terms], [0.5, 0.25], 0.5, torch.bfloat16))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_traces_the_op(backend):
    # Under the interpreter the operator stays opaque in the graph (an interpreted kernel cannot
    # be traced); on CUDA, triton_op hands the kernel itself to the compiler.
    def f(x, k):
        return tk.stage_combine(x, [k], [0.5], 1.0, torch.float32) * 2

    x, k = torch.randn(16), torch.randn(16, dtype=torch.bfloat16)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, k), f(x, k))


@pytest.mark.slow
def test_without_the_interpreter_in_a_subprocess():
    """Compiled-Triton mode on a machine without a GPU: the module imports, triton_op finds the
    kernel (so torch.compile can inline it on CUDA), and CPU tensors get a clear error."""
    code = """
import torch
from torch._library.triton import get_triton_kernels_for_op
from prg_fast.ode import backends
from prg_fast.kernels import stage_combine as tk
assert tk.IMPORT_ERROR is None and not tk.INTERPRETED
assert get_triton_kernels_for_op(tk.QUALNAME), "triton_op did not find the wrapped kernel"
try:
    tk.stage_combine(torch.randn(3), [], [])
    raise SystemExit("no error for CPU tensors")
except RuntimeError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
why = backends.unavailable_reason("triton", torch.device("cpu"))
assert why and "TRITON_INTERPRET=1" in why, why
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_imports_without_triton_in_a_subprocess():
    code = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError
import torch
from prg_fast.ode import backends
from prg_fast.kernels import stage_combine as tk
assert tk.IMPORT_ERROR == "triton not installed (pip install triton)", tk.IMPORT_ERROR
assert not hasattr(tk, "_stage_combine_kernel")
assert backends.status()["triton"] == tk.IMPORT_ERROR
try:
    backends.resolve("triton", torch.device("cpu"))
    raise SystemExit("resolve did not raise")
except RuntimeError as e:
    assert "triton not installed" in str(e), e
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# -- the backend, end to end ----------------------------------------------------------------------


def test_backend_resolves_under_the_interpreter():
    assert backends.triton_interpreted()
    assert backends.status()["triton"] is None
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None
    chosen = backends.select("triton", torch.device("cpu"))  # the Backend a solve calls (term chaining around)
    assert chosen.name == "triton" and chosen.fn is tk.stage_combine and chosen.rows_fn is tk.stage_combine_rows
    name, fn = backends.resolve("triton", torch.device("cpu"))
    assert name == "triton"
    x = torch.randn(5)
    torch.testing.assert_close(fn(x, [x], [2.0], 1.0, None), 3 * x)
    # "auto" never picks interpreted Triton on the CPU
    assert backends.resolve("auto", torch.device("cpu"))[0] != "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("adjoint", [True, False])
def test_reverse_matches_reference_backend(mlp, dtype, method, adjoint):
    model = mlp(dim=6, hidden=16).to(dtype)
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    params = list(model.parameters())
    results = {}
    for backend in ("triton", "reference"):
        z = prg_fast.reverse(model, x, steps=3, method=method, adjoint=adjoint, backend=backend)
        g = torch.linspace(-1, 1, z.numel(), dtype=dtype).reshape(z.shape)
        results[backend] = [z] + list(torch.autograd.grad(z, [x] + params, g))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, **tol)


def test_reverse_bfloat16_network_and_save_at(mlp):
    # a bf16 network: the kernel writes its inputs in bf16 from a float32 state
    model = mlp(dim=6, hidden=16).to(torch.bfloat16)
    x = torch.randn(4, 6, requires_grad=True)
    params = list(model.parameters())
    results = {}
    for backend in ("triton", "reference"):
        z = prg_fast.reverse(model, x, steps=2, method="rk4", backend=backend, save_at=[0.5, 1.0])
        assert z.shape == (2, 4, 6) and z.dtype == torch.float32
        results[backend] = [z] + list(torch.autograd.grad(z.sum(), [x] + params))
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

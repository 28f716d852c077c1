"""prg_fast._C's direct entries to stage_combine / stage_combine_into (csrc/python_calls.cpp), the
engine's path on plain tensors: the same results and gradients as torch.ops, and everything
torch.ops does above the dispatcher -- tensor subclasses, __torch_function__ modes, unusual
argument types -- handed back to torch.ops (NotImplemented) instead of skipped. And for inputs
beyond the common case, as the engine calls the entries (prg_fast.ode.ops.stage_combine /
stage_combine_into) -- non-contiguous and expanded terms, mixed dtypes, numpy and bool numbers,
more than 8 terms, the transforms and tracers above and below the dispatcher, errors raised with
the GIL released -- the result, or the error, is torch.ops' own."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from prg_fast.ode import ops
from combine_checks import make_inputs

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")

if ops.HAS_OPS:
    from prg_fast import _C

OP = torch.ops.prg_fast.stage_combine.default if ops.HAS_OPS else None
INTO = torch.ops.prg_fast.stage_combine_into.default if ops.HAS_OPS else None


# 2^16 and more run with the GIL released
@pytest.mark.parametrize("n", [1, 4096, 1 << 16])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_plain_call_is_taken_and_equals_torch_ops(n, out_dtype):
    base, terms, coeffs = make_inputs(n, 3, torch.float32, torch.float32)
    out = _C.stage_combine(base, tuple(terms), coeffs, 0.5, out_dtype)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, OP(base, terms, coeffs, 0.5, out_dtype))
    into = torch.empty_like(out)
    assert _C.stage_combine_into(base, terms, coeffs, 0.5, into) is None
    assert torch.equal(into, out)


def test_gradients_go_through_the_autograd_kernel():
    base, terms, coeffs = make_inputs(7, 2, torch.float64, torch.float64)
    base.requires_grad_()
    terms[1].requires_grad_()
    out = _C.stage_combine(base, terms, coeffs, 0.5, None)
    assert out.grad_fn is not None
    out.backward(torch.ones_like(out))
    assert torch.equal(base.grad, torch.full_like(base, 0.5))
    assert torch.equal(terms[1].grad, torch.full_like(base, coeffs[1]))
    assert terms[0].grad is None


@pytest.mark.parametrize(
    "coeffs,alpha",
    [([True, 0.5], 1.0), ([np.float64(0.25), 0.5], 1.0), ([torch.tensor(0.25), 0.5], 1.0), ([0.25, 0.5], 10**400)],
)
def test_unusual_numbers_go_to_torch_ops(coeffs, alpha):
    base, terms, _ = make_inputs(5, 2, torch.float32, torch.float32)
    assert _C.stage_combine(base, terms, coeffs, alpha, None) is NotImplemented
    assert _C.stage_combine_into(base, terms, coeffs, alpha, torch.empty(5)) is NotImplemented
    try:
        expected = OP(base, terms, coeffs, alpha, None)
    except Exception as e:  # torch.ops' own refusal is what the engine's call gives too
        with pytest.raises(type(e)):
            ops.stage_combine(base, terms, coeffs, alpha, None)
    else:
        assert torch.equal(ops.stage_combine(base, terms, coeffs, alpha, None), expected)


def test_unusual_containers_go_to_torch_ops():
    base, terms, coeffs = make_inputs(5, 2, torch.float32, torch.float32)
    assert _C.stage_combine(base, iter(terms), coeffs, 1.0, None) is NotImplemented
    assert _C.stage_combine(base, terms, coeffs, 1.0, "float32") is NotImplemented
    assert _C.stage_combine(base, terms * 5, coeffs * 5, 1.0, None) is NotImplemented  # > 8: the kernel's check
    with pytest.raises(RuntimeError, match="at most 8 terms"):
        ops.stage_combine(base, terms * 5, coeffs * 5, 1.0, None)


def test_kernel_errors_are_torch_ops_errors():
    base, terms, coeffs = make_inputs(5, 2, torch.float32, torch.float32)
    for call in (lambda f: f(base, terms, coeffs[:1], 1.0, None), lambda f: f(base, [terms[0][:3]], [1.0], 1.0, None)):
        with pytest.raises(RuntimeError) as fast:
            call(_C.stage_combine)
        with pytest.raises(RuntimeError) as boxed:
            call(OP)
        assert str(fast.value).splitlines()[0] == str(boxed.value).splitlines()[0]


class Tagged(torch.Tensor):
    """A subclass whose __torch_function__ records every call it sees."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_sees_the_call():
    base, terms, coeffs = make_inputs(5, 1, torch.float32, torch.float32)
    tagged = base.as_subclass(Tagged)
    Tagged.seen.clear()
    assert _C.stage_combine(tagged, terms, coeffs, 1.0, None) is NotImplemented
    assert _C.stage_combine(base, [terms[0].as_subclass(Tagged)], coeffs, 1.0, None) is NotImplemented
    out = ops.stage_combine(tagged, terms, coeffs, 1.0)
    assert OP in Tagged.seen and type(out) is Tagged


def test_a_torch_function_mode_sees_the_call():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    base, terms, coeffs = make_inputs(5, 1, torch.float32, torch.float32)
    with Record():
        assert _C.stage_combine(base, terms, coeffs, 1.0, None) is NotImplemented
        ops.stage_combine(base, terms, coeffs, 1.0)
        ops.stage_combine_into(base, terms, coeffs, 1.0, torch.empty(5))
    assert OP in seen and INTO in seen


@pytest.mark.parametrize("n", [5, 1 << 16])  # 2^16: the mode's Python runs from a call that released the GIL
def test_a_torch_dispatch_mode_sees_the_call(n):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    base, terms, coeffs = make_inputs(n, 1, torch.float32, torch.float32)
    with Record():  # below the dispatcher's Python key: the direct entry reaches it as torch.ops does
        out = _C.stage_combine(base, terms, coeffs, 1.0, None)
        _C.stage_combine_into(base, terms, coeffs, 1.0, torch.empty(n))
    assert isinstance(out, torch.Tensor) and OP in seen and INTO in seen


def test_into_keeps_the_version_bump_and_the_grad_refusal():
    base, terms, coeffs = make_inputs(5, 1, torch.float32, torch.float32)
    out = torch.empty(5)
    version = out._version
    _C.stage_combine_into(base, terms, coeffs, 1.0, out)
    assert out._version > version
    with pytest.raises(RuntimeError, match="requires grad"):
        _C.stage_combine_into(base.requires_grad_(), terms, coeffs, 1.0, out)


def test_torch_compile_traces_both_entries_through_torch_ops():
    def f(base, k, out):
        ops.stage_combine_into(base, [k], [0.5], 1.0, out)
        return ops.stage_combine(out, [k], [0.25], 1.0) * 2

    base, terms, _ = make_inputs(16, 1, torch.float32, torch.float32)
    expected = f(base, terms[0], torch.empty(16))
    compiled = torch.compile(f, backend="eager", fullgraph=True)  # a graph break would raise here
    torch.testing.assert_close(compiled(base, terms[0], torch.empty(16)), expected)


# -- inputs beyond the common case: the engine's entry against torch.ops, result or error ------------

BIG = 1 << 16  # from this size on the direct entries release the GIL


def _outcome(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 -- the error itself is what is compared
        return error


def _assert_same(fast, boxed):
    if isinstance(boxed, Exception) or isinstance(fast, Exception):
        assert type(fast) is type(boxed), (fast, boxed)
        assert str(fast).splitlines()[0] == str(boxed).splitlines()[0]
    elif isinstance(boxed, (tuple, list)):
        assert len(fast) == len(boxed)
        for a, b in zip(fast, boxed):
            _assert_same(a, b)
    elif isinstance(boxed, torch.Tensor):
        describe = lambda t: (type(t), t.dtype, t.shape, t.device)  # noqa: E731
        assert describe(fast) == describe(boxed)
        if not boxed.is_meta:
            assert torch.equal(fast, boxed)
    else:
        assert fast == boxed


def _inputs(n=(6, 4), terms=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), [torch.randn(n, generator=g) for _ in range(terms)]


BASE, (T1, T2) = _inputs()
ROW, COLUMN = torch.randn(4), torch.randn(6, 1)

COMBINE_CASES = {
    "non-contiguous": lambda f: f(BASE.t(), [T1.t(), T2.t()], [0.5, 0.25], 1.0, None),
    "expanded": lambda f: f(ROW.expand(6, 4), [T1, COLUMN.expand(6, 4)], [0.5, 0.25], 1.0, None),
    "mixed term dtypes": lambda f: f(BASE, [T1.double(), T2], [0.5, 0.25], 1.0, None),
    "float64 base, float32 terms": lambda f: f(BASE.double(), [T1, T2], [0.5, 0.25], 1.0, None),
    "integer tensors": lambda f: f(BASE.int(), [T1, T2], [0.5, 0.25], 1.0, None),
    "int numbers": lambda f: f(BASE, [T1, T2], [1, 2], 3, None),
    "bool numbers": lambda f: f(BASE, [T1, T2], [True, False], 1.0, None),
    "numpy numbers": lambda f: f(BASE, [T1, T2], [np.float32(0.5), np.int64(2)], np.float64(1.5), None),
    "a 0-dim tensor as number": lambda f: f(BASE, [T1, T2], [torch.tensor(0.5), 0.1], 1.0, None),
    "an int too large for a double": lambda f: f(BASE, [T1], [10**400], 1.0, None),
    "8 terms": lambda f: f(BASE, [T1] * 8, [0.1] * 8, 1.0, None),
    "9 terms": lambda f: f(BASE, [T1] * 9, [0.1] * 9, 1.0, None),
    "no terms": lambda f: f(BASE, [], [], 2.0, None),
    "coeff count": lambda f: f(BASE, [T1, T2], [0.5], 1.0, None),
    "shape": lambda f: f(BASE, [T1[:3]], [0.5], 1.0, None),
    "None as a term": lambda f: f(BASE, [None], [1.0], 1.0, None),
    "tuples": lambda f: f(BASE, (T1, T2), (0.5, 0.25), 1.0, None),
    "out_dtype bfloat16": lambda f: f(BASE, [T1, T2], [0.5, 0.25], 1.0, torch.bfloat16),
    "out_dtype int32": lambda f: f(BASE, [T1, T2], [0.5, 0.25], 1.0, torch.int32),
    "out_dtype as a string": lambda f: f(BASE, [T1, T2], [0.5, 0.25], 1.0, "float32"),
    "0-dim": lambda f: f(torch.tensor(1.0), [torch.tensor(2.0)], [0.5], 1.0, None),
    "empty": lambda f: f(torch.empty(0, 3), [torch.empty(0, 3)], [0.5], 1.0, None),
    "complex": lambda f: f(*_complex(), [0.5], 1.0, None),
    "meta tensors": lambda f: f(BASE.to("meta"), [T1.to("meta")], [0.5], 1.0, None),
    "a meta term with a CPU base": lambda f: f(BASE, [T1.to("meta")], [0.5], 1.0, None),
    "a Parameter": lambda f: f(torch.nn.Parameter(BASE.clone()), [T1], [0.5], 1.0, None).detach(),
    "vmap": lambda f: torch.vmap(lambda b, t: f(b, [t], [0.5], 1.0, None))(BASE, T1),
    "vmap, an unbatched term": lambda f: torch.vmap(lambda b: f(b, [T1[0]], [0.5], 1.0, None))(BASE),
    "torch.func.grad": lambda f: torch.func.grad(lambda b: f(b, [T1], [0.5], 2.0, None).sum())(BASE),
    "torch.func.jvp": lambda f: torch.func.jvp(lambda b: f(b, [T1], [0.5], 2.0, None), (BASE,), (T2,)),
    "create_graph": lambda f: _double_grad(f),
}


def _complex():
    return torch.ones(3, dtype=torch.complex64), [torch.ones(3, dtype=torch.complex64)]


def _first_requires_grad(terms):
    return [terms[0].requires_grad_(True), *terms[1:]]


def _partial_overlap(f, n):
    """out = memory[:n] and base = memory[1:]: the kernel's refusal, the same from both entries."""
    memory = torch.zeros(n + 1)
    f(memory[1:], _inputs(n)[1], [0.5, 0.25], 1.0, memory[:n])
    return memory


def _double_grad(f):
    b, t = BASE.clone().requires_grad_(), T1.clone().requires_grad_()
    out = f(b, [t, T2], [0.5, 0.25], 2.0, None)
    gb, gt = torch.autograd.grad(out, [b, t], torch.ones_like(out), create_graph=True)
    return gb.detach(), gt.detach(), gb.requires_grad


def _large(f):
    """An error raised by the kernel while the GIL is released."""
    base, (t1, _) = _inputs(BIG)
    return f(base, [t1[:-1]], [0.5], 1.0, None)


COMBINE_CASES["an error with the GIL released"] = _large


@pytest.mark.parametrize("case", sorted(COMBINE_CASES))
def test_stage_combine_equals_torch_ops(case):
    call = COMBINE_CASES[case]
    _assert_same(_outcome(lambda: call(ops.stage_combine)), _outcome(lambda: call(OP)))


def _into(f, n, out, base=None, terms=None):
    b, ts = _inputs(n)
    b = b if base is None else base(b)
    f(b, ts if terms is None else terms(ts), [0.5, 0.25], 1.0, out if not callable(out) else out(b, ts))
    return out if not callable(out) else None


INTO_CASES = {
    "plain": lambda f, n: _into(f, n, torch.empty(n)),
    "out is the base": lambda f, n: _into(f, n, lambda b, ts: b),
    "out is a term": lambda f, n: _into(f, n, lambda b, ts: ts[1]),
    "out overlaps the base in part": lambda f, n: _partial_overlap(f, n),
    "non-contiguous out": lambda f, n: _into(f, n, torch.zeros(2 * n)[::2]),
    "out shape": lambda f, n: _into(f, n, torch.empty(n + 1)),
    "integer out": lambda f, n: _into(f, n, torch.empty(n, dtype=torch.int32)),
    "bfloat16 out": lambda f, n: _into(f, n, torch.empty(n, dtype=torch.bfloat16)),
    "a term requiring grad": lambda f, n: _into(f, n, torch.empty(n), terms=_first_requires_grad),
    "term shape": lambda f, n: _into(f, n, torch.empty(n), terms=lambda ts: [ts[0][:-1], ts[1]]),
    "a numpy out": lambda f, n: _into(f, n, np.zeros(n, dtype=np.float32)),
    "a subclass out": lambda f, n: _into(f, n, torch.empty(n).as_subclass(_Sub)),
}


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("n", [5, BIG])
@pytest.mark.parametrize("case", sorted(INTO_CASES))
def test_stage_combine_into_equals_torch_ops(case, n):
    torch.manual_seed(0)
    fast = _outcome(lambda: INTO_CASES[case](ops.stage_combine_into, n))
    torch.manual_seed(0)
    boxed = _outcome(lambda: INTO_CASES[case](INTO, n))
    _assert_same(fast, boxed)


def test_tracers_record_the_operator_from_the_direct_entry():
    """jit.trace, make_fx and FakeTensorMode see the call from the engine's entry as from torch.ops."""
    def f(b, t):
        return ops.stage_combine(b, [t], [0.5], 1.0, None) * 2

    traced = torch.jit.trace(f, (BASE, T1))
    assert "prg_fast::stage_combine" in str(traced.graph)
    assert torch.equal(traced(T1, BASE), f(T1, BASE))
    graph = make_fx(f)(BASE, T1)
    assert "prg_fast.stage_combine" in graph.code and torch.equal(graph(T1, BASE), f(T1, BASE))
    with FakeTensorMode() as mode:
        fake = f(mode.from_tensor(BASE), mode.from_tensor(T1))
    assert fake.shape == BASE.shape and fake.dtype == BASE.dtype


def test_torch_compile_aot_eager_fullgraph_through_the_engine_entry():
    compiled = torch.compile(lambda b, t: ops.stage_combine(b, [t], [0.5], 1.0, None) * 2,
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(BASE, T1), OP(BASE, [T1], [0.5], 1.0, None) * 2)


@pytest.mark.parametrize("call", [
    lambda m: ops.stage_combine(BASE, [m(T1)], [0.5], 1.0, None),
    lambda m: ops.stage_combine(m(BASE), [T1], [0.5], 1.0, None),
    lambda m: ops.stage_combine_into(BASE, [T1], [0.5], 1.0, m(torch.empty_like(BASE))),
    lambda m: ops.stage_combine_rows(BASE, [m(T1)], torch.ones(1, 2)),
    lambda m: ops.stage_combine_rows(BASE, [T1], m(torch.ones(1, 2))),
], ids=["meta term", "meta base", "meta out", "rows: meta term", "rows: meta coeffs"])
def test_a_meta_tensor_beside_cpu_ones_is_an_error(call):
    """The fake kernel runs whenever one input is a meta tensor; it handed back an uninitialised
    CPU tensor (garbage values) for a meta term beside a CPU base, where the reference raises."""
    with pytest.raises(RuntimeError, match=r"stage_combine\w*: \w+(\[0\])? is on (meta|cpu) but base is on"):
        call(lambda t: t.to("meta"))

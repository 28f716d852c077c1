"""Review of prg_fast._C's direct entries (csrc/python_calls.cpp) as the engine calls them
(prg_fast.ode.ops.stage_combine / stage_combine_into): for inputs beyond the common case --
non-contiguous and expanded terms, mixed dtypes, numpy and bool numbers, more than 8 terms, the
transforms and tracers above and below the dispatcher, errors raised with the GIL released --
the result, or the error, is torch.ops' own."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from prg_fast.ode import ops

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")

OP = torch.ops.prg_fast.stage_combine.default if ops.HAS_OPS else None
INTO = torch.ops.prg_fast.stage_combine_into.default if ops.HAS_OPS else None
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

"""prg_fast._C's direct entries to stage_combine / stage_combine_into (csrc/python_calls.cpp), the
engine's path on plain tensors: the same results and gradients as torch.ops, and everything
torch.ops does above the dispatcher -- tensor subclasses, __torch_function__ modes, unusual
argument types -- handed back to torch.ops (NotImplemented) instead of skipped."""
import numpy as np
import pytest
import torch
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

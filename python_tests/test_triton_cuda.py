"""The compiled Triton kernels on a GPU against prg_fast.ode.reference (pytest -m cuda).
On CPU-only machines the same kernels are tested under the interpreter by test_triton_kernels.py."""
import importlib.util

import pytest
import torch

import prg_fast
from prg_fast.ode import reference
from combine_checks import truth as _truth

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]


@pytest.fixture(scope="module")
def combine():
    from prg_fast.kernels import stage_combine as module

    if module.IMPORT_ERROR:
        pytest.skip(f"Triton kernels unavailable: {module.IMPORT_ERROR}")
    if module.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: unset it to test the compiled kernels")
    return module.stage_combine




@pytest.mark.parametrize("n", [1, 7, 1023, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("n_terms", [0, 1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(combine, n, n_terms, dtype):
    base = torch.randn(n, device="cuda", dtype=torch.float64).to(dtype)
    terms = [torch.randn(n, device="cuda", dtype=torch.float64).to(dtype) for _ in range(n_terms)]
    coeffs = [0.37 * (j + 1) * (-1) ** j for j in range(n_terms)]
    out = combine(base, terms, coeffs, 0.9)
    ref = reference.stage_combine(base, terms, coeffs, 0.9)
    truth = _truth(base, terms, coeffs, 0.9)
    scale = (0.9 * base.double().abs() + sum(abs(c) * t.double().abs() for c, t in zip(coeffs, terms))).max().item()
    bound = 2 * (ref.double() - truth).abs().max().item() + (n_terms + 1) * torch.finfo(dtype).eps * scale
    assert (out.double() - truth).abs().max().item() <= bound


def test_mixed_and_non_contiguous(combine):
    base = torch.randn(64, 33, device="cuda").t()
    terms = [torch.randn(33, 128, device="cuda")[:, ::2].to(torch.bfloat16) for _ in range(3)]
    out = combine(base, terms, [0.5, -1.0, 2.0], 1.0, torch.bfloat16)
    torch.testing.assert_close(out, reference.stage_combine(base, terms, [0.5, -1.0, 2.0], 1.0, torch.bfloat16), rtol=0, atol=0)


def test_opcheck_and_compile(combine):
    base = torch.randn(5, 7, device="cuda", requires_grad=True)
    terms = [torch.randn(5, 7, device="cuda", requires_grad=True)]
    torch.library.opcheck(torch.ops.prg_fast.stage_combine_triton.default, (base, terms, [0.5], 1.0, None))
    f = torch.compile(lambda b, t: combine(b, [t], [0.5]) * 2, fullgraph=True)
    torch.testing.assert_close(f(base.detach(), terms[0].detach()), (base + 0.5 * terms[0]).detach() * 2)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_reverse_gradients(conv, method):
    model = conv(channels=3).cuda()
    x = torch.randn(3, 3, 9, 9, device="cuda", requires_grad=True)
    out = prg_fast.reverse(model, x, steps=4, method=method, backend="triton")
    ref = prg_fast.reverse(model, x, steps=4, method=method, backend="reference", adjoint=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs = [x] + list(model.parameters())
    for a, b in zip(torch.autograd.grad(out.square().sum(), inputs), torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

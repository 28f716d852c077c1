"""What every stage_combine backend test compares with: the float64 truth of the same rounded
inputs, the same arithmetic done by PyTorch at the kernel's dtype, and deterministic inputs."""
import torch


def coeffs_for(n_terms):
    return [0.37 * (j + 1) * (-1) ** j for j in range(n_terms)]


def make_inputs(shape, n_terms, base_dtype, term_dtype, device="cpu"):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    base = torch.randn(shape, dtype=torch.float64, device=device).to(base_dtype)
    terms = [torch.randn(shape, dtype=torch.float64, device=device).to(term_dtype) for _ in range(n_terms)]
    return base, terms, coeffs_for(n_terms)


def truth(base, terms, coeffs, alpha):
    """The exact value (to float64 rounding) from the already rounded inputs."""
    out = alpha * base.double()
    for c, t in zip(coeffs, terms):
        out = out + c * t.double()
    return out


def pytorch_at_dtype(base, terms, coeffs, alpha, dtype):
    """The same arithmetic done with PyTorch ops in `dtype` (the rounding a user would get)."""
    out = alpha * base.to(dtype)
    for c, t in zip(coeffs, terms):
        out = out + c * t.to(dtype)
    return out

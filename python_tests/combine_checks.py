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
    """The same arithmetic done with PyTorch ops in `dtype` (the rounding a user would get): the terms
    summed, then the base added, as the kernels do."""
    increment = None
    for c, t in zip(coeffs, terms):
        increment = c * t.to(dtype) if increment is None else increment + c * t.to(dtype)
    out = alpha * base.to(dtype)
    return out if increment is None else out + increment


def make_rows_inputs(shape, n_terms, base_dtype, term_dtype, rows, coeff_dtype=torch.float64, device="cpu"):
    """base, terms and a (rows, 1 + n_terms) coefficient tensor with distinct rows."""
    base, terms, _ = make_inputs(shape, n_terms, base_dtype, term_dtype, device)
    coeffs = torch.randn(rows, 1 + n_terms, dtype=torch.float64, device=device).to(coeff_dtype)
    return base, terms, coeffs


def rows_truth(base, terms, coeffs):
    """The exact per-row combination (to float64 rounding) of the already rounded inputs."""
    c = coeffs.double()
    view = (c.shape[0],) + (1,) * (base.dim() - 1)
    out = c[:, 0].reshape(view) * base.double()
    for j, t in enumerate(terms):
        out = out + c[:, j + 1].reshape(view) * t.double()
    return out


def rows_pytorch_at_dtype(base, terms, coeffs, dtype):
    c = coeffs.to(dtype)
    view = (c.shape[0],) + (1,) * (base.dim() - 1)
    increment = None
    for j, t in enumerate(terms):
        term = c[:, j + 1].reshape(view) * t.to(dtype)
        increment = term if increment is None else increment + term
    out = c[:, 0].reshape(view) * base.to(dtype)
    return out if increment is None else out + increment


def assert_rows_flash_rule(out, base, terms, coeffs, ref, dtype):
    """The backend's error against the float64 truth is at most twice that of the reference or of
    PyTorch's own arithmetic at `dtype` (the flash-attention rule), plus one rounding of the
    result's scale per term (Higham's bound for a sum of n products)."""
    truth = rows_truth(base, terms, coeffs)
    ours = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    if out.numel() == 0:
        return
    theirs = (ref.double() - truth).abs().max().item()
    at_dtype = (rows_pytorch_at_dtype(base, terms, coeffs, dtype).double() - truth).abs().max().item()
    c = coeffs.double().abs()
    view = (c.shape[0],) + (1,) * (base.dim() - 1)
    scale = c[:, 0].reshape(view) * base.double().abs()
    for j, t in enumerate(terms):
        scale = scale + c[:, j + 1].reshape(view) * t.double().abs()
    ulp = (len(terms) + 1) * torch.finfo(dtype).eps * scale.max().item()
    assert ours <= 2 * max(theirs, at_dtype) + ulp, (ours, theirs, at_dtype)


# (base, terms, out) dtypes of the mixed-precision combinations the engine makes
MIXED_DTYPES = [
    (torch.float32, torch.bfloat16, torch.bfloat16),  # stage input for a bf16 network
    (torch.float32, torch.bfloat16, torch.float32),  # final combination, float32 state
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float64),
    (torch.float64, torch.float32, torch.float64),
]

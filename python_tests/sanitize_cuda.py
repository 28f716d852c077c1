"""A few prg_fast::stage_combine calls on CUDA that cover every code path of the kernel: the
vectorised body with a scalar tail, the fully scalar (misaligned) path, each pointer type, 0 and 8
terms, the all-float64 kernel and the runtime-typed float64 kernel. Meant to run under the
sanitizer, where any out-of-bounds or misaligned access is reported:

    compute-sanitizer --tool memcheck --error-exitcode 1 python python_tests/sanitize_cuda.py

Sizes are small so the run stays fast under instrumentation. Exits non-zero when a result is wrong;
prints "skipped" and exits 0 when there is no GPU or no CUDA build.
"""
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cuda: skipped: needs a CUDA GPU")
        return 0
    from prg_fast.ode import ops, reference

    if ops.CUDA_ERROR:
        print(f"sanitize_cuda: skipped: needs prg_fast's CUDA ops: {ops.CUDA_ERROR}")
        return 0

    torch.manual_seed(0)
    dev = "cuda"
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    cases = [
        # (n, n_terms, base dtype, term dtype, out dtype, element offset of every view)
        (4099, 3, f32, f32, f32, 0),  # 4-wide vectors + tail of 3
        (4099, 3, f32, bf16, bf16, 0),  # 8-wide vectors (mixed widths) + tail
        (4099, 8, bf16, bf16, bf16, 0),  # eight terms
        (4099, 0, f16, f16, f32, 0),  # no terms: a scaled cast
        (4099, 2, f32, f32, f32, 1),  # misaligned: scalar path only
        (4099, 2, bf16, f16, f32, 3),
        (1, 1, f32, bf16, f32, 0),  # shorter than one vector
        (7, 2, f16, f16, f16, 0),
        (1027, 3, f64, f64, f64, 0),  # all-float64 kernel (2-wide)
        (1027, 3, f64, f64, f64, 1),
        (1027, 3, f32, f64, bf16, 0),  # runtime-typed float64 kernel
        (1027, 2, f64, bf16, f32, 1),
    ]
    failures = 0
    for n, n_terms, bd, td, od, off in cases:
        def view(dtype):
            return torch.randn(n + off, device=dev, dtype=torch.float64).to(dtype)[off:]

        base = view(bd)
        terms = [view(td) for _ in range(n_terms)]
        coeffs = [0.25 * (j + 1) * (-1) ** j for j in range(n_terms)]
        out = ops.stage_combine(base, terms, coeffs, 0.75, od)
        ref = reference.stage_combine(base, terms, coeffs, 0.75, od)
        torch.cuda.synchronize()
        tol = {f64: 1e-12, f32: 1e-5, f16: 2e-3, bf16: 2e-2}[od]
        ok = out.dtype == od and torch.allclose(out.double(), ref.double(), rtol=tol, atol=tol * 4)
        failures += not ok
        print(f"sanitize_cuda: n={n} terms={n_terms} {bd}/{td}->{od} offset={off}: {'ok' if ok else 'WRONG'}")

    # a non-contiguous input and an empty one
    x = torch.randn(64, 33, device=dev).t()
    out = ops.stage_combine(x, [x, x], [1.0, 1.0], 1.0)
    failures += not torch.allclose(out, 3 * x)
    assert ops.stage_combine(torch.empty(0, device=dev), [], [], 1.0).numel() == 0
    torch.cuda.synchronize()
    print(f"sanitize_cuda: {'all ok' if failures == 0 else f'{failures} WRONG'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

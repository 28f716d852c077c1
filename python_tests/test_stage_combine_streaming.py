"""The CPU kernel's streaming-store path (float32 calls whose operands exceed the last-level
cache write their output with non-temporal stores, csrc/cpu/stage_combine.cpp): forced on for every
size by PRG_FAST_CPU_STREAMING_BYTES=0, which the kernel reads once per process, so the checks run
in a child process. Every term count, lengths around the 8-float vector and 32-byte alignment, an
output at every float offset from a 32-byte boundary, and outputs that are an input (in place)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from prg_fast.ode import ops

pytestmark = [
    pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason="streaming stores are compiled for x86-64 only (elsewhere the plain loop runs)"),
]

CHILD = textwrap.dedent("""
    import sys
    import torch
    import prg_fast  # registers the operators
    sys.path.insert(0, sys.argv[1])
    from combine_checks import make_inputs, pytorch_at_dtype, truth

    F32 = torch.float32

    def check(out, base, terms, coeffs, alpha, what):
        exact = truth(base, terms, coeffs, alpha)
        ours = (out.double() - exact).abs().max().item()
        torchs = (pytorch_at_dtype(base, terms, coeffs, alpha, F32).double() - exact).abs().max().item()
        scale = (abs(alpha) * base.double().abs()
                 + sum(abs(c) * t.double().abs() for c, t in zip(coeffs, terms))).max().item()
        ulp = (len(terms) + 1) * torch.finfo(F32).eps * scale
        assert ours <= 2 * torchs + ulp, (what, ours, torchs)

    for k in range(9):
        for n in (1, 7, 8, 9, 31, 33, 1000, 4099):
            base, terms, coeffs = make_inputs(n, k, F32, F32)
            check(torch.ops.prg_fast.stage_combine(base, terms, coeffs, 0.9, None), base, terms, coeffs, 0.9,
                  f"functional k={k} n={n}")
            buffer = torch.full((n + 16,), float("nan"))
            for offset in range(8):
                out = buffer[offset:offset + n]
                torch.ops.prg_fast.stage_combine_into(base, terms, coeffs, 0.9, out)
                check(out, base, terms, coeffs, 0.9, f"into k={k} n={n} offset={offset}")
            for alias in range(k + 1):  # out is base, then each term: every element read before written
                base, terms, coeffs = make_inputs(n, k, F32, F32)
                before = [base.clone()] + [t.clone() for t in terms]
                out = base if alias == 0 else terms[alias - 1]
                torch.ops.prg_fast.stage_combine_into(base, terms, coeffs, 0.9, out)
                check(out, before[0], before[1:], coeffs, 0.9, f"in place on input {alias}, k={k} n={n}")
    print("streaming checks passed")
""")


def test_streaming_stores_match_the_float64_truth():
    env = dict(os.environ, PRG_FAST_CPU_STREAMING_BYTES="0", OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", CHILD, here], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "streaming checks passed" in done.stdout

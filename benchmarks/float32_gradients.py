"""Float32 rounding in an adaptive solve's gradient (issue 32): adaptive.py's CNF-sized problem (a
16-256-256-16 MLP velocity, batch 512, t in [0, 10], dopri5 at rtol 1e-6 / atol 1e-8) over seeds of
its network and y0. Per seed: the gradient error of a training step against the float64 reference
(adaptive.grad_reference: dopri8 at 1e-12) for ours (the default strategy) and torchdiffeq's
backprop, the ratio, and their evaluations (equal unless rounding flips a step's acceptance). One seed's ratio is mostly rounding luck; the median
over seeds says which solver's float32 arithmetic loses less (RESULTS.md, "Adaptive odeint").

    OMP_NUM_THREADS=1 python benchmarks/float32_gradients.py --seeds 8    # ~30-60 s a seed
"""
from __future__ import annotations

import statistics

import torch

import adaptive
import harness
import prg_fast

COLUMNS = [("seed", "seed"), ("prg_fast gradient error", "ours", ".3g"), ("torchdiffeq", "tdq", ".3g"),
           ("ratio", "ratio", ".2f"), ("evaluations", "nfe"), ("torchdiffeq's", "nfe_tdq")]


def measure(seed: int) -> dict:
    import torchdiffeq

    _, _, t, rtol, atol = adaptive.rows()["cnf"]  # the row's times and tolerances; its network and y0 per seed
    tol = dict(rtol=rtol, atol=atol)
    torch.manual_seed(seed)
    f, y0 = adaptive.MLP(16, 256), torch.randn(512, 16)
    ref, out = adaptive.grad_reference(f, y0, t), {}
    for name, solve in (("ours", lambda g, y: prg_fast.odeint(g, y, t, method="dopri5", **tol)),
                        ("tdq", lambda g, y: torchdiffeq.odeint(g, y, t, method="dopri5", **tol))):
        counted = adaptive.Counting(f)
        out[name] = harness.rel_err(adaptive.train_step(solve, counted, y0, t), ref)
        out["nfe_" + name] = counted.n
    # (the same controller and tolerances: the same steps, unless rounding flips an accept/reject decision)
    return dict(ours=out["ours"], tdq=out["tdq"], ratio=out["ours"] / out["tdq"], nfe=out["nfe_ours"],
                nfe_tdq=out["nfe_tdq"])


def main(argv=None):
    p = harness.parser("float32_gradients", __doc__)
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args(argv)
    print(harness.machine(), flush=True)
    log = harness.Results(args, "float32_gradients", dict(problem="cnf"), key=("seed",))
    for seed in range(args.seeds):
        log.measure([dict(seed=seed)], "ratio", lambda: [measure(seed)])
    rows = log.rows([dict(seed=s) for s in range(args.seeds)])
    print(harness.table(rows, COLUMNS))
    print(f"median ratio {statistics.median(r['ratio'] for r in rows):.2f}; ours above on "
          f"{sum(r['ratio'] > 1 for r in rows)} of {len(rows)} seeds")


if __name__ == "__main__":
    main()

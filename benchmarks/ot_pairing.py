"""Time the OTCFM minibatch pairing: squared-Euclidean cost matrix + exact assignment
(scipy.optimize.linear_sum_assignment), as prg_fast.paths.ot_permutation does it per training step
(float32 inputs: the cost matrix is computed in float32). Each round draws a new batch, then times
the cost matrix, the assignment and the whole ot_permutation (harness.interleaved).

    python benchmarks/ot_pairing.py                                   # Gaussian "data", 3072-d
    python benchmarks/ot_pairing.py --data folder:/work/shared/data/cifar10   # real CIFAR-10 images
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

import harness
from prg_fast.paths import ot_cost_matrix, ot_permutation


def main(argv=None) -> int:
    p = harness.parser("ot_pairing", __doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--dim", type=int, default=3 * 32 * 32, help="data dimension for Gaussian data")
    p.add_argument("--data", default=None, help="a prg_fast DATA spec to pair real images with noise")
    p.add_argument("--repeats", type=int, default=20, help="rounds (a new batch each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = None
    if args.data:
        from prg_fast.data import load_data

        images = load_data(args.data, "train", augment=None)
    source = f"{args.data} train images" if images is not None else f"Gaussian data, dim {args.dim}"
    print(f"# OT pairing: {source}; {harness.machine()}; {harness.clock_name(torch.device('cpu'), torch.get_num_threads())}, "
          f"median of {args.repeats} rounds")
    log = harness.Results(args, "ot_pairing", dict(data=args.data, dim=args.dim, repeats=args.repeats,
                                                   threads=torch.get_num_threads()), key=("batch",))
    for n in args.batches:
        if "total" in log.get({"batch": n}):
            continue
        pair = {}

        def draw(_):
            x0 = torch.randn(n, args.dim, generator=gen) if images is None else \
                images.batch(torch.randint(0, len(images), (n,), generator=gen), augment=False)[0]
            pair.update(x0=x0, x1=torch.randn(x0.shape, generator=gen))
            pair["c"] = ot_cost_matrix(pair["x0"], pair["x1"]).numpy()

        t = harness.interleaved({"cost": lambda: ot_cost_matrix(pair["x0"], pair["x1"]).numpy(),
                                 "assignment": lambda: linear_sum_assignment(pair["c"]),
                                 "total": lambda: ot_permutation(pair["x0"], pair["x1"])}, args.repeats, before_round=draw)
        log.add({"batch": n}, **{k: v["seconds"] for k, v in t.items()}, total_spread=t["total"]["spread"])
    print(harness.table(log.rows([{"batch": n} for n in args.batches]), [
        ("batch", "batch"), ("cost matrix ms", lambda r: 1e3 * r["cost"], ".2f"),
        ("assignment ms", lambda r: 1e3 * r["assignment"], ".2f"), ("total ms (ot_permutation)", lambda r: 1e3 * r["total"], ".2f"),
        ("spread of the total", lambda r: f"{100 * r['total_spread']:.0f}%")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""PRG on digits with a diffusion-parametrised network: the tiny UNet pretrained on the GVP path to
predict the velocity (flow matching), the noise (epsilon) or v, each then finetuned as a PRG
classifier through the exact adjoint, at the same budget and with the same recipe as
benchmarks/prg_tables.py's Table 1 (its defaults: pretraining 1,500 steps, finetuning 250).

    python benchmarks/prediction_prg.py                                           # the recipe's budget
    python benchmarks/prediction_prg.py --pretrain-steps 750 --finetune-steps 120 # a smaller one
    python benchmarks/prediction_prg.py --quick                                    # smoke (numbers meaningless)

An epsilon / v network returns the velocity its prediction implies on the path (prg_fast.models.UNet
with prediction=...), so finetuning, evaluation and the classifier run unchanged. Every run is a
prg_fast run directory under --out (reused when finished). Prints a Markdown table; the pretraining
losses are each prediction's own mean squared error and not comparable across rows.
"""
import argparse
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

PREDICTIONS = ("velocity", "epsilon", "v")


def run_one(spec):
    import torch

    torch.set_num_threads(1)
    from prg_fast.training.finetune import finetune
    from prg_fast.training.pretrain import pretrain

    start = time.perf_counter()
    pre = pretrain(**spec["pretrain"])
    ft = finetune(**spec["finetune"])
    return {"prediction": spec["prediction"], "pretrain_loss": pre.metrics["loss"], "top1": ft.metrics["top1"],
            "wall_s": time.perf_counter() - start}


def specs(a):
    for prediction in PREDICTIONS:
        pre_dir = os.path.join(a.out, f"pretrain-gvp-{prediction}")
        yield {"prediction": prediction,
               "pretrain": dict(data="digits", path="gvp", prediction=prediction, model="tiny", steps=a.pretrain_steps,
                                batch_size=64, lr=5e-4, warmup=min(100, a.pretrain_steps // 2), out=pre_dir, device="cpu",
                                seed=0, progress=False, num_samples=16, log_every=max(1, a.pretrain_steps // 20),
                                ckpt_every=max(1, a.pretrain_steps // 4)),
               "finetune": dict(checkpoint=pre_dir, out=os.path.join(a.out, f"ft-gvp-{prediction}"), data="digits",
                                batch_size=64, ode_steps=4, method="euler", lr=1e-3, weight_decay=0.05,
                                label_smoothing=0.1, steps=a.finetune_steps, device="cpu", seed=0, progress=False,
                                beta=0.1, log_every=max(1, a.finetune_steps // 20),
                                ckpt_every=max(1, a.finetune_steps // 4))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--finetune-steps", type=int, default=250)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--out", default="benchmarks/out/prediction_prg")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.pretrain_steps, a.finetune_steps, a.out = 4, 2, a.out + "_quick"
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        rows = list(pool.map(run_one, list(specs(a))))
    print(f"digits, tiny UNet, GVP path; pretraining {a.pretrain_steps} steps, finetuning {a.finetune_steps} steps "
          f"(4 Euler steps, beta 0.1); {platform.machine()} CPU, {a.jobs} workers x one thread; "
          f"{(time.perf_counter() - start) / 60:.1f} min\n")
    print("| pretrained to predict | PRG finetuned top-1 (%) | pretrain loss (own target) | wall, pretrain + finetune (min) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['prediction']} | {100 * r['top1']:.2f} | {r['pretrain_loss']:.4f} | {r['wall_s'] / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

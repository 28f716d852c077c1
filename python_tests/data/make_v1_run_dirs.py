"""Writes the v1 run-directory fixtures (v1_pretrain/, v1_finetune/) with the code of commit 783dfbf,
the last one before the training layer was restructured:

    mkdir /tmp/old && git archive 783dfbf prg_fast | tar x -C /tmp/old
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old python python_tests/data/make_v1_run_dirs.py python_tests/data
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old python python_tests/data/make_v1_run_dirs.py --expected python_tests/data

The "tiny" preset is shrunk to 4 channels while writing (the test shrinks it the same way while
reading) so that the checkpoints stay small enough to commit. With `--expected`, the same old code
resumes copies of the two run directories for one more step and writes the weights it reaches to
v1_step3_expected.pt: what today's code must reproduce exactly when it resumes them."""
import os
import shutil
import sys

import torch

import prg_fast
from prg_fast.models import unet

assert "/prg_fast/" in prg_fast.__file__
SMALL = dict(model_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=1,
             dropout=0.0, use_scale_shift_norm=True, norm_groups=2)


def main(dest: str) -> None:
    torch.set_num_threads(1)
    unet.PRESETS["tiny"] = SMALL
    from prg_fast.finetune import finetune
    from prg_fast.train import pretrain

    pre, ft = os.path.join(dest, "v1_pretrain"), os.path.join(dest, "v1_finetune")
    for d in (pre, ft):
        shutil.rmtree(d, ignore_errors=True)
    pretrain(data="digits", path="otcfm", model="tiny", steps=2, batch_size=16, lr=1e-3, warmup=0, log_every=1,
             num_samples=1, sample_steps=1, progress=False, device="cpu", out=pre)
    finetune(data="digits", checkpoint=pre, steps=2, batch_size=16, ode_steps=2, log_every=1, eval_batch_size=512,
             progress=False, device="cpu", out=ft)
    for d in (pre, ft):  # only the checkpoint is the fixture; the rest is rewritten on resume
        for name in os.listdir(d):
            if name != "checkpoint.pt":
                os.remove(os.path.join(d, name))


def expected(dest: str) -> None:
    import tempfile

    torch.set_num_threads(1)
    unet.PRESETS["tiny"] = SMALL
    from prg_fast.finetune import finetune
    from prg_fast.train import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        pre, ft = os.path.join(tmp, "pre"), os.path.join(tmp, "ft")
        shutil.copytree(os.path.join(dest, "v1_pretrain"), pre)
        shutil.copytree(os.path.join(dest, "v1_finetune"), ft)
        # the finetuning run names its pretraining directory by absolute path: point it at the copy
        ck = torch.load(os.path.join(ft, "checkpoint.pt"), weights_only=True)
        ck["args"]["checkpoint"] = pre
        torch.save(ck, os.path.join(ft, "checkpoint.pt"))
        p = pretrain(data="digits", path="otcfm", model="tiny", steps=3, batch_size=16, lr=1e-3, warmup=0,
                     log_every=1, num_samples=1, sample_steps=1, progress=False, device="cpu", out=pre)
        f = finetune(data="digits", checkpoint=pre, steps=3, batch_size=16, ode_steps=2, log_every=1,
                     eval_batch_size=512, progress=False, device="cpu", out=ft)
        torch.save({"pretrain_model": p.model.state_dict(), "pretrain_ema": p.ema.state_dict(),
                    "pretrain_loss": p.metrics["loss"], "finetune_flow": f.classifier.flow.state_dict(),
                    "finetune_head": f.classifier.head.state_dict(), "finetune_top1": f.metrics["top1"],
                    "finetune_lr": f.history[-1][5]},
                   os.path.join(dest, "v1_step3_expected.pt"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--expected"]:
        expected(sys.argv[2])
    else:
        main(sys.argv[1])

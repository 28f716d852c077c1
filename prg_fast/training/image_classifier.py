"""Training the small image classifier a class reward reads (prg_fast.models.ImageClassifier): on the
real images of a data set's training split, evaluated on its test split. Seeded and independent of
the global random state (its own generator), so the same arguments give the same network."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..data import ImageData
from ..models import ImageClassifier
from .runs import check_int

__all__ = ["train_image_classifier", "classifier_top1"]


def train_image_classifier(train: ImageData, test: ImageData, *, steps: int = 500, batch_size: int = 128,
                           lr: float = 2e-3, width: int = 32, seed: int = 0,
                           device="cpu") -> Tuple[ImageClassifier, float]:
    """(the trained classifier in eval mode, its test top-1): AdamW with a cosine decay over `steps`
    steps of `batch_size` images drawn with replacement (the data set's augmentation applied)."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # the classifier's initial weights, without touching the global stream
        torch.manual_seed(int(seed))
        net = ImageClassifier(train.shape[0], train.num_classes, width=width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        x, y = train.batch(idx, device=device, generator=gen)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return net, classifier_top1(net, test, device=device)


@torch.no_grad()
def classifier_top1(net: torch.nn.Module, data: ImageData, *, batch_size: int = 512, device="cpu") -> float:
    """Top-1 accuracy of `net` on every image of `data` (no augmentation)."""
    correct = 0
    for start in range(0, len(data), batch_size):
        x, y = data.batch(range(start, min(start + batch_size, len(data))), augment=False, device=device)
        correct += int((net(x).argmax(dim=1) == y).sum())
    return correct / max(len(data), 1)

"""A pretrained flow's published weights (prg_fast.flow, `save_flow_weights`), `finetune --weights
FILE` in place of --checkpoint, `extract --checkpoint FILE`, the errors for wrong and corrupt
files, and finetuning's held-out validation split (--val-size). Tiny UNet on 8x8 digits, a few
steps: conftest's `pretrained` run is the source."""
import json
import os

import numpy as np
import pytest
import torch

from prg_fast import cli
from prg_fast.training.checkpoints import (FLOW_FORMAT, FLOW_KEYS, CheckpointError, build_model, load_checkpoint,
                                           save_flow_weights)
from prg_fast.training.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(data="digits", batch_size=20, ode_steps=2, method="euler", progress=False, log_every=1, beta=0.1)


@pytest.fixture(scope="module")
def flow_file(pretrained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w") / "flow.pt")
    save_flow_weights(pretrained, path)
    return path


def test_the_file_holds_the_ema_network_and_how_it_was_trained(pretrained, flow_file):
    flow = torch.load(flow_file, weights_only=True)
    pre = load_checkpoint(pretrained)
    assert flow["format"] == FLOW_FORMAT and set(FLOW_KEYS) <= set(flow) and "optimizer" not in flow
    assert flow["step"] == pre["step"] and flow["model_config"] == pre["model_config"]
    for k, v in pre["ema"].items():
        assert torch.equal(flow["ema"][k], v)
    assert flow["trained"]["steps"] == 60 and "out" not in flow["trained"]
    assert os.path.getsize(flow_file) < 0.5 * os.path.getsize(os.path.join(pretrained, "checkpoint.pt"))
    with pytest.raises(FileExistsError, match="not overwritten"):
        save_flow_weights(pretrained, flow_file)


def test_finetune_from_the_file_is_finetune_from_the_checkpoint(pretrained, flow_file, tmp_path):
    a = finetune(checkpoint=pretrained, out=str(tmp_path / "a"), steps=3, labels_per_class=2, **FAST)
    b = finetune(weights=flow_file, out=str(tmp_path / "b"), steps=3, labels_per_class=2, **FAST)
    for (k, va), vb in zip(a.classifier.state_dict().items(), b.classifier.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.metrics["top1"] == b.metrics["top1"] and b.metrics["pretrain_step"] == 60
    # the same through the command line, --weights FILE without --model
    out = str(tmp_path / "cli")
    assert cli.main(["finetune", "--data", "digits", "--weights", flow_file, "--out", out, "--steps", "3",
                     "--batch-size", "20", "--ode-steps", "2", "--labels-per-class", "2", "--beta", "0.1",
                     "--log-every", "1", "--no-progress"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["top1"] == b.metrics["top1"] and m["weights"] == os.path.abspath(flow_file) and m["checkpoint"] is None


def test_extract_reads_the_file(pretrained, flow_file, tmp_path):
    from prg_fast.training.evaluate import extract

    a = extract(pretrained, "digits", str(tmp_path / "a.npz"), ode_steps=2)
    b = extract(flow_file, "digits", str(tmp_path / "b.npz"), ode_steps=2)
    fa, fb = (np.load(str(tmp_path / f"{n}.npz")) for n in "ab")
    assert np.array_equal(fa["test_features"], fb["test_features"]) and a["weights"] == b["weights"] == "ema"
    assert b["checkpoint_kind"] == "flow"


def test_wrong_and_corrupt_files(pretrained, flow_file, tmp_path, capsys):
    def run(*extra):
        rc = cli.main(["finetune", "--data", "digits", "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress",
                       *extra])
        return rc, capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    rc, err = run("--weights", str(garbage))
    assert rc == 2 and "is not a readable checkpoint" in err
    torn = tmp_path / "torn.pt"
    torn.write_bytes(open(flow_file, "rb").read()[:2000])
    rc, err = run("--weights", str(torn))
    assert rc == 2 and "is not a readable checkpoint" in err
    state = tmp_path / "state_dict.pt"
    torch.save(build_model(load_checkpoint(pretrained)).state_dict(), state)
    rc, err = run("--weights", str(state))
    assert rc == 2 and f"not a prg_fast flow weights checkpoint (format None, expected '{FLOW_FORMAT}')" in err
    rc, err = run("--weights", str(tmp_path / "missing.pt"))
    assert rc == 2 and "no checkpoint at" in err
    rc, err = run("--weights", flow_file, "--checkpoint", pretrained)
    assert rc == 2 and "not both" in err
    rc, err = run("--weights", flow_file, "--raw-weights")
    assert rc == 2 and "EMA weights only" in err
    finetune(checkpoint=pretrained, out=str(tmp_path / "ft"), steps=1, **FAST)
    rc, err = run("--weights", str(tmp_path / "ft"))
    assert rc == 2 and "is a finetuned classifier" in err
    with pytest.raises(CheckpointError, match="not a prg_fast pretraining checkpoint"):
        save_flow_weights(flow_file, str(tmp_path / "again.pt"))  # published from a pretraining run only


def test_val_size_holds_out_a_seeded_split(pretrained, tmp_path, monkeypatch):
    from prg_fast.data import ImageData, load_data, validation_split

    r = finetune(checkpoint=pretrained, out=str(tmp_path / "v"), steps=2, val_size=100, seed=3, **FAST)
    m = r.metrics
    assert m["val_size"] == 100 and m["train_size"] == 1437 - 100 and 0 <= m["val_top1"] <= 1
    # the labelled subset is drawn from what validation_split leaves: no validation image is trained on
    seen, real_batch = [], ImageData.batch

    def spy(self, indices, **kw):
        if self.split == "train" and kw.get("augment", True):
            seen.append(self.images[torch.as_tensor(indices)].clone())
        return real_batch(self, indices, **kw)

    monkeypatch.setattr(ImageData, "batch", spy)
    r2 = finetune(checkpoint=pretrained, out=str(tmp_path / "v2"), steps=1, val_size=100, seed=3,
                  labels_per_class=2, **FAST)
    assert r2.metrics["train_size"] == 20 and len(torch.cat(seen)) == 20
    train = load_data("digits", "train", augment=None)
    fit, val = validation_split(train.labels, 100, 3, 10)
    key = lambda im: bytes(im.flatten().tolist())  # noqa: E731
    fit_images, val_images = {key(im) for im in train.images[fit]}, {key(im) for im in train.images[val]}
    assert {key(im) for im in torch.cat(seen)} <= fit_images - val_images

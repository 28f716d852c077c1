"""Frozen-feature evaluation: linear probe, k-NN, feature extraction (`prg-fast extract`), top-1."""
import json
import os

import numpy as np
import pytest
import torch

import prg_fast
from prg_fast import cli
from prg_fast.classifier import PRGClassifier
from prg_fast.data import load_data
from prg_fast.training.evaluate import extract_features, knn_accuracy, linear_probe, load_features, top1_accuracy
from prg_fast.training.finetune import extract, finetune
from prg_fast.training.pretrain import build_model, load_checkpoint


# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n_per_class=40, classes=4, dim=10, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + spread * rng.normal(size=(len(y), dim))
    return x, y


def test_probes_separate_separable_features():
    tx, ty = _blobs(seed=0)
    vx, vy = _blobs(seed=0)[0] + 0.1 * np.random.default_rng(1).normal(size=tx.shape), ty
    lin = linear_probe(tx, ty, vx, vy)
    knn = knn_accuracy(tx, ty, vx, vy, k=5)
    assert lin["top1"] >= 0.95 and knn["top1"] >= 0.95
    assert lin["C"] in (0.01, 0.1, 1.0, 10.0) and lin["dim"] == 10 and knn["k"] == 5


def test_probes_are_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    tx, vx = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    ty, vy = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert abs(linear_probe(tx, ty, vx, vy, C=1.0)["top1"] - 0.25) < 0.1
    assert abs(knn_accuracy(tx, ty, vx, vy, k=10)["top1"] - 0.25) < 0.1


def test_probes_accept_tensors_and_image_shaped_features():
    tx, ty = _blobs(classes=3, dim=16)
    t = torch.tensor(tx).reshape(-1, 1, 4, 4)
    assert knn_accuracy(t, torch.tensor(ty), t, torch.tensor(ty), k=1)["top1"] == 1.0


def test_probes_bad_inputs():
    tx, ty = _blobs()
    with pytest.raises(ValueError, match="labels"):
        linear_probe(tx, ty[:-1], tx, ty)
    with pytest.raises(ValueError, match="differ in size"):
        knn_accuracy(tx, ty, tx[:, :5], ty)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(tx, np.zeros_like(ty), tx, ty)
    with pytest.raises(ValueError, match="k"):
        knn_accuracy(tx, ty, tx, ty, k=0)
    bad = tx.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        knn_accuracy(bad, ty, tx, ty)


@pytest.mark.slow
def test_extract_cli_writes_features_equal_to_reverse(pretrained, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    code = cli.main(["extract", "--data", "digits", "--checkpoint", pretrained, "--t", "0.5", "--ode-steps", "3",
                     "--out", str(out), "--no-progress", "--probe"])
    assert code == 0
    f = load_features(str(out))
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert f["train_features"].shape == (1437, 64) and f["test_features"].shape == (360, 64)
    assert f["train_features"].dtype == np.float32
    np.testing.assert_array_equal(f["train_labels"], train.labels.numpy())
    np.testing.assert_array_equal(f["test_labels"], test.labels.numpy())
    assert list(f["feature_shape"]) == [1, 8, 8] and f["classes"] == [str(c) for c in range(10)]
    assert f["meta"]["t"] == 0.5 and f["meta"]["ode_steps"] == 3 and f["meta"]["weights"] == "ema"
    # the features are the EMA network's reversed states at t
    ema = build_model(load_checkpoint(pretrained), ema=True)
    x, _ = test.batch(list(range(5)), augment=False)
    with torch.no_grad():
        z = prg_fast.reverse(ema, x, 0.5, steps=3, method="euler")
    np.testing.assert_allclose(f["test_features"][:5], z.flatten(1).numpy(), rtol=1e-5, atol=1e-5)
    probe = json.load(open(tmp_path / "feats.probe.json"))
    assert 0.0 <= probe["linear_probe_top1"] <= 1.0 and 0.0 <= probe["knn_top1"] <= 1.0
    assert probe["linear_probe_top1"] > 0.5  # reversed digits keep most of the class information at t = 0.5
    assert "linear probe top-1" in capsys.readouterr().err


@pytest.mark.slow
def test_extract_into_a_run_directory_writes_and_prints_its_metrics(pretrained, tmp_path, capsys):
    out = tmp_path / "feats"
    assert cli.main(["extract", "--data", "digits", "--checkpoint", pretrained, "--ode-steps", "2", "--out", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["features.npz", "metrics.json"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.load(open(out / "metrics.json"))
    assert printed == written and written["features"] == str(out / "features.npz")
    assert written["n_train"] == 1437 and load_features(str(out / "features.npz"))["meta"]["ode_steps"] == 2


@pytest.mark.slow
def test_extract_save_at_and_finetuned_checkpoint(pretrained, tmp_path):
    run = tmp_path / "ft"
    finetune(checkpoint=pretrained, out=str(run), steps=2, ode_steps=2, batch_size=32, t0=0.25, progress=False)
    meta = extract(str(run), "digits", str(tmp_path / "f.npz"), save_at=[0.5, 1.0])
    f = load_features(str(tmp_path / "f.npz"))
    assert meta["checkpoint_kind"] == "finetune" and meta["weights"] == "finetuned"
    assert meta["t0"] == 0.25 and meta["ode_steps"] == 2  # the finetuned segment and solver are the defaults
    assert f["train_features"].shape == (1437, 128) and list(f["feature_shape"]) == [2, 8, 8]


def test_extract_bad_inputs(pretrained, tmp_path):
    with pytest.raises(ValueError, match=".npz"):
        extract(pretrained, "digits", str(tmp_path / "f.txt"))
    with pytest.raises(ValueError, match="t0 < t"):
        extract(pretrained, "digits", str(tmp_path / "f.npz"), t=0.25, t0=0.5)
    with pytest.raises(FileNotFoundError):
        extract(str(tmp_path / "nothing"), "digits", str(tmp_path / "f.npz"))
    with pytest.raises(ValueError, match="not written by"):
        np.savez(str(tmp_path / "other.npz"), a=np.zeros(3))
        load_features(str(tmp_path / "other.npz"))


def test_extract_features_function_shapes(conv):
    """Every image, in order, in batches of 100 (the last one 60): features (N, S*C, H, W) that are
    reverse's states at each save_at time concatenated on the channel dim, in save_at's order, and
    the data's labels. float32 tolerances: a batch's arithmetic may differ with its size."""
    torch.manual_seed(0)
    flow = conv(channels=1)
    data = load_data("digits", "test")
    feats, labels = extract_features(flow, data, 1.0, steps=2, save_at=[0.5, 1.0], flatten=False, batch_size=100)
    assert feats.shape == (360, 2, 8, 8) and labels.shape == (360,)
    x, _ = data.batch(list(range(len(data))), augment=False)
    with torch.no_grad():
        states = prg_fast.reverse(flow, x, 1.0, steps=2, method="euler", save_at=[0.5, 1.0])  # (2, N, 1, 8, 8)
    np.testing.assert_allclose(feats, torch.cat(list(states), dim=1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, data.labels.numpy())


def test_top1_accuracy_does_not_depend_on_batch_size(conv):
    torch.manual_seed(0)
    clf = PRGClassifier.build(conv(channels=1), (1, 8, 8), 10, steps=2)
    data = load_data("digits", "test")
    a, pred = top1_accuracy(clf, data, batch_size=360, return_predictions=True)
    b = top1_accuracy(clf, data, batch_size=7)
    assert a == b == int((pred == data.labels).sum()) / len(data)

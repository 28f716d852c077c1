"""Evaluation: top-1 of a classifier on a data split, feature extraction along the reversed
trajectory, and the two standard probes of frozen features (linear probe, k-NN).

    feats = extract_features(flow, load_data("digits", "train", augment=None), t=1.0, steps=20)
    linear_probe(train_x, train_y, test_x, test_y)   # {"top1": ..., "C": ..., ...}
    knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    save_features("f.npz", ...) / load_features("f.npz")   # the `prg-fast extract` file format

Feature file (.npz written by `prg-fast extract`): train_features (N, D) float32, train_labels
(N,) int64, test_features, test_labels, feature_shape (C, H, W) of one sample before flattening,
classes, and a JSON string `meta` (checkpoint, data, t0, t, save_at, steps, method, ...).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..ode import reverse

__all__ = ["top1_accuracy", "extract_features", "linear_probe", "knn_accuracy", "save_features", "load_features",
           "probe_features"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, mininterval=1.0,
                leave=False)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def top1_accuracy(classifier: torch.nn.Module, data, *, batch_size: int = 256, device=None,
                  progress: bool = False, return_predictions: bool = False):
    """Fraction of `data` (an ImageData split; augmentation is not applied) that `classifier`
    labels correctly, computed in eval mode. Per-sample computations only, so the number does not
    depend on batch_size. Returns a float (and the predictions, with return_predictions=True)."""
    batch_size = _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else _device_of(classifier)
    was_training = classifier.training
    classifier.eval()
    preds = []
    try:
        with _progress(len(data), "evaluate", progress) as bar:
            for start in range(0, len(data), batch_size):
                idx = list(range(start, min(start + batch_size, len(data))))
                x, _ = data.batch(idx, augment=False, device=device)
                preds.append(classifier(x).argmax(dim=1).cpu())
                bar.update(len(idx))
    finally:
        classifier.train(was_training)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    correct = int((pred == data.labels).sum())
    acc = correct / max(len(data), 1)
    return (acc, pred) if return_predictions else acc


@torch.no_grad()
def extract_features(flow: torch.nn.Module, data, t: float = 1.0, *, t0: float = 0.0, steps: int = 20,
                     method: str = "euler", save_at: Optional[Sequence[float]] = None, batch_size: int = 256,
                     device=None, progress: bool = False, flatten: bool = True, **reverse_kwargs):
    """Reverse every image of `data` (no augmentation) with `flow` from t0 to t; returns
    (features, labels) as numpy arrays: features (N, D) float32 when flatten (else (N, C', H, W)),
    with several save_at states concatenated on the channel dim, labels (N,) int64."""
    from ..classifier import PRGClassifier

    batch_size = _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else _device_of(flow)
    clf = PRGClassifier(flow, torch.nn.Identity(), t=t, t0=t0, steps=steps, method=method, save_at=save_at,
                        adjoint=False, **reverse_kwargs)
    was_training = flow.training
    flow.eval()
    out = []
    try:
        with _progress(len(data), f"extract t={t:g}", progress) as bar:
            for start in range(0, len(data), batch_size):
                idx = list(range(start, min(start + batch_size, len(data))))
                x, _ = data.batch(idx, augment=False, device=device)
                z = clf.features(x).float().cpu()
                out.append(z.flatten(1) if flatten else z)
                bar.update(len(idx))
    finally:
        flow.train(was_training)
    feats = torch.cat(out).numpy()
    return feats, data.labels.numpy().astype(np.int64)


def _check_xy(train_x, train_y, test_x, test_y):
    arrays = []
    for name, a in (("train_x", train_x), ("train_y", train_y), ("test_x", test_x), ("test_y", test_y)):
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arrays.append(a)
    tx, ty, vx, vy = arrays
    for name, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"{name} features must have shape (N, D...) with N >= 1, got {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"{name} labels must have shape ({x.shape[0]},), got {y.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} features hold non-finite values")
    tx, vx = tx.reshape(tx.shape[0], -1), vx.reshape(vx.shape[0], -1)
    if tx.shape[1] != vx.shape[1]:
        raise ValueError(f"train and test features differ in size: {tx.shape[1]} vs {vx.shape[1]}")
    if len(np.unique(ty)) < 2:
        raise ValueError("the training labels must hold at least two classes")
    return tx.astype(np.float64), ty.astype(np.int64), vx.astype(np.float64), vy.astype(np.int64)


def linear_probe(train_x, train_y, test_x, test_y, *, C: Optional[float] = None,
                 Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), max_iter: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Multinomial logistic regression (scikit-learn) on standardised frozen features.

    With C=None the inverse regularisation strength is chosen from `Cs` by 5-fold cross-validation
    on the training split only (the test split is never looked at before the final score).
    Returns {"top1", "train_top1", "C", "n_train", "n_test", "dim"}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tx, ty, vx, vy = _check_xy(train_x, train_y, test_x, test_y)

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))

    if C is None:
        Cs = [float(c) for c in Cs]
        if not Cs or any(not (c > 0 and math.isfinite(c)) for c in Cs):
            raise ValueError(f"Cs must be positive finite numbers, got {Cs!r}")
        folds = min(5, int(np.unique(ty, return_counts=True)[1].min()))
        if len(Cs) == 1 or folds < 2:
            C = Cs[-1]
        else:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            scores = [cross_val_score(model(c), tx, ty, cv=cv).mean() for c in Cs]
            C = Cs[int(np.argmax(scores))]
    elif not (isinstance(C, numbers.Real) and C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a positive number, got {C!r}")
    clf = model(float(C)).fit(tx, ty)
    return {"top1": float((clf.predict(vx) == vy).mean()), "train_top1": float((clf.predict(tx) == ty).mean()),
            "C": float(C), "n_train": int(len(ty)), "n_test": int(len(vy)), "dim": int(tx.shape[1])}


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 20, metric: str = "cosine",
                 weights: str = "distance") -> Dict[str, Any]:
    """k-nearest-neighbour classification of the test features by the training features
    (scikit-learn; cosine distance by default, as is usual for representation probes).
    Returns {"top1", "k", "metric", "n_train", "n_test", "dim"}."""
    from sklearn.neighbors import KNeighborsClassifier

    tx, ty, vx, vy = _check_xy(train_x, train_y, test_x, test_y)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > len(ty):
        raise ValueError(f"k ({k}) exceeds the number of training samples ({len(ty)})")
    if weights not in ("uniform", "distance"):
        raise ValueError(f"weights must be 'uniform' or 'distance', got {weights!r}")
    knn = KNeighborsClassifier(n_neighbors=int(k), metric=metric, weights=weights, algorithm="brute").fit(tx, ty)
    return {"top1": float((knn.predict(vx) == vy).mean()), "k": int(k), "metric": metric,
            "n_train": int(len(ty)), "n_test": int(len(vy)), "dim": int(tx.shape[1])}


def probe_features(features: Dict[str, Any], *, k: int = 20) -> Dict[str, Any]:
    """Linear probe and k-NN on a loaded feature file (the dict of load_features)."""
    args = (features["train_features"], features["train_labels"], features["test_features"], features["test_labels"])
    lin, knn = linear_probe(*args), knn_accuracy(*args, k=k)
    return {"linear_probe_top1": lin["top1"], "linear_probe_C": lin["C"], "knn_top1": knn["top1"], "knn_k": knn["k"]}


def save_features(path: str, *, train_features, train_labels, test_features, test_labels, feature_shape,
                  classes: Sequence[str], meta: Dict[str, Any]) -> None:
    """Write a feature file atomically (temporary file in the same folder, then rename)."""
    from .runs import atomic_write

    if not path.endswith(".npz"):
        raise ValueError(f"the feature file must end in .npz, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arrays = dict(train_features=np.asarray(train_features, dtype=np.float32),
                  train_labels=np.asarray(train_labels, dtype=np.int64),
                  test_features=np.asarray(test_features, dtype=np.float32),
                  test_labels=np.asarray(test_labels, dtype=np.int64),
                  feature_shape=np.asarray(feature_shape, dtype=np.int64),
                  classes=np.asarray([str(c) for c in classes]),
                  meta=np.asarray(json.dumps(meta)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_features(path: str) -> Dict[str, Any]:
    """Read a feature file written by `prg-fast extract` / save_features."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no feature file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz feature file: {e}") from e
    missing = [k for k in ("train_features", "train_labels", "test_features", "test_labels") if k not in out]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by `prg-fast extract`")
    out["classes"] = [str(c) for c in out.get("classes", [])]
    out["meta"] = json.loads(str(out["meta"])) if "meta" in out else {}
    return out

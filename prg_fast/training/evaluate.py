"""Evaluation: top-1 of a classifier on a data split (sharded over torchrun's ranks), feature
extraction along the reversed trajectory, the two standard probes of frozen features (linear probe,
k-NN), and the `prg-fast evaluate` / `prg-fast extract` commands' work (evaluate, extract).

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
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..classifier import check_segment, feature_shape
from ..data import load_data
from .checkpoints import build_classifier, build_model, check_data_fits, load_finetune_checkpoint, load_model_checkpoint
from .distributed import resolve_device, run_on_ranks
from .flows import prg_velocity
from .rundir import CheckpointError, RunDir, atomic_write, checkpoint_file, claim_file, write_json
from .runs import check_int, check_number

__all__ = ["map_batches", "top1_accuracy", "sharded_correct", "extract_features", "linear_probe", "knn_accuracy", "save_features",
           "load_features", "probe_features", "evaluate", "extract"]


@torch.no_grad()
def map_batches(module: torch.nn.Module, fn, data, *, batch_size: int, device=None, indices=None, desc: str = "",
                progress: bool = False) -> torch.Tensor:
    """fn(x) over batches of `data`'s images (no augmentation; `indices`, default all, in order),
    concatenated on the CPU; without gradients and with `module` in eval mode meanwhile (its mode
    is restored after); a progress bar over images when `progress`."""
    indices = range(len(data)) if indices is None else indices
    if device is None:  # where the module's parameters are
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    out = []
    try:
        with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
                  mininterval=1.0, leave=False) as bar:
            for start in range(0, len(indices), batch_size):
                idx = list(indices[start:start + batch_size])
                x, _ = data.batch(idx, augment=False, device=device)
                out.append(fn(x).cpu())
                bar.update(len(idx))
    finally:
        module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _predict(classifier: torch.nn.Module, data, *, batch_size: int, device=None, indices=None,
             progress: bool = False) -> torch.Tensor:
    check_int("batch_size", batch_size, 1)
    return map_batches(classifier, lambda x: classifier(x).argmax(dim=1), data, batch_size=batch_size, device=device,
                       indices=indices, desc="evaluate", progress=progress)


def sharded_correct(classifier: torch.nn.Module, data, ctx, *, batch_size: int = 256, progress: bool = False) -> int:
    """Correctly labelled images of `data`, each rank of `ctx` (a training.distributed.Dist)
    classifying every world-th image and the counts all-reduced: every rank returns the whole
    split's count."""
    indices = range(ctx.rank, len(data), ctx.world)
    pred = _predict(classifier, data, batch_size=batch_size, device=ctx.device, indices=indices,
                    progress=progress and ctx.main)
    correct = torch.tensor([int((pred == data.labels[list(indices)]).sum())], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(correct)
    return int(round(float(correct.item())))


def top1_accuracy(classifier: torch.nn.Module, data, *, batch_size: int = 256, device=None,
                  progress: bool = False, return_predictions: bool = False):
    """Fraction of `data` (an ImageData split; augmentation is not applied) that `classifier`
    labels correctly, computed in eval mode. Per-sample computations only, so the number does not
    depend on batch_size. Returns a float (and the predictions, with return_predictions=True)."""
    pred = _predict(classifier, data, batch_size=batch_size, device=device, progress=progress)
    acc = int((pred == data.labels).sum()) / max(len(data), 1)
    return (acc, pred) if return_predictions else acc


@torch.no_grad()
def extract_features(flow: torch.nn.Module, data, t: float = 1.0, *, t0: float = 0.0, steps: int = 20,
                     method: str = "euler", save_at: Optional[Sequence[float]] = None, batch_size: int = 256,
                     device=None, progress: bool = False, flatten: bool = True, **reverse_kwargs):
    """Reverse every image of `data` (no augmentation) with `flow` from t0 to t; returns
    (features, labels) as numpy arrays: features (N, D) float32 when flatten (else (N, C', H, W)),
    with several save_at states concatenated on the channel dim, labels (N,) int64."""
    from ..classifier import PRGClassifier

    batch_size = check_int("batch_size", batch_size, 1)
    clf = PRGClassifier(flow, torch.nn.Identity(), t=t, t0=t0, steps=steps, method=method, save_at=save_at,
                        adjoint=False, **reverse_kwargs)

    def features(x):
        z = clf.features(x).float()
        return z.flatten(1) if flatten else z

    feats = map_batches(flow, features, data, batch_size=batch_size, device=device, desc=f"extract t={t:g}",
                        progress=progress)
    return feats.numpy(), data.labels.numpy().astype(np.int64)


def _check_xy(train_x, train_y, test_x, test_y):
    tx, ty, vx, vy = (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                      for a in (train_x, train_y, test_x, test_y))
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
    else:
        check_number("C", C, 0.0, math.inf, lo_open=True)
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
    check_int("k", k, 1)
    if k > len(ty):
        raise ValueError(f"k ({k}) exceeds the number of training samples ({len(ty)})")
    # scikit-learn checks metric and weights itself, naming them
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
    if not path.endswith(".npz"):
        raise ValueError(f"the feature file must end in .npz, got {path!r}")
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


# -------------------------------------------------------------------------------------------------
# the evaluate and extract commands' work


def evaluate(checkpoint: str, data: Optional[str] = None, *, ode_steps: Optional[int] = None,
             method: Optional[str] = None, batch_size: int = 256, device: str = "auto", progress: bool = False,
             out: Optional[str] = None, model: Optional[torch.nn.Module] = None, default_out: bool = False,
             force: bool = False) -> Dict[str, Any]:
    """Top-1 of a finetuned checkpoint on the test split of `data` (default: the data it was
    finetuned on), with its training step count or `ode_steps` / `method`. Writes out/metrics.json
    when `out` is given (default_out=True: CHECKPOINT_DIR/evaluate-METHOD-K when out is None);
    returns the metrics dict (with "out" where it was written)."""
    files = RunDir(out, None, 0, "evaluate") if out else None
    if files is not None:
        files.claim(force=force)  # before any work
    ckpt = load_finetune_checkpoint(checkpoint)
    where = checkpoint_file(checkpoint)
    if files is None and default_out:  # a folder next to the checkpoint, named by the solver used
        c = ckpt["classifier"]
        name = f"evaluate-{method or c['method']}-{ode_steps or c['steps']}"
        files = RunDir(os.path.join(os.path.dirname(os.path.abspath(where)), name), None, 0, "evaluate")
        files.claim(force=force)
    spec = data or ckpt["data"]
    test = load_data(spec, "test", augment=None)
    if test.num_classes != int(ckpt["num_classes"]):
        raise CheckpointError(f"{where} classifies {ckpt['num_classes']} classes, but {spec} has {test.num_classes}; "
                              f"evaluate on the data set it was finetuned on ({ckpt['data']})")
    check_data_fits(test, ckpt, where, "was finetuned on")
    if ckpt.get("classes") and list(ckpt["classes"]) != list(test.classes):
        print(f"prg-fast evaluate: warning: class names differ from those finetuned on ({ckpt['classes'][:5]}... vs "
              f"{test.classes[:5]}...); labels are matched by sorted position", file=sys.stderr)
    clf = build_classifier(ckpt, steps=ode_steps, method=method, model=model)
    return run_on_ranks(lambda ctx: _evaluate(ctx, ckpt, where, spec, test, clf, batch_size, progress, files), device)


def _evaluate(ctx, ckpt, where, spec, test, clf, batch_size, progress, files) -> Dict[str, Any]:
    dev = ctx.device
    clf = clf.to(dev)
    t_start = time.perf_counter()
    correct = sharded_correct(clf, test, ctx, batch_size=batch_size, progress=progress)
    metrics = {
        "command": "evaluate",
        "top1": correct / max(len(test), 1),
        "correct": correct,
        "test_size": len(test),
        "ode_steps": clf.steps,
        "method": clf.method,
        "trained_ode_steps": ckpt["classifier"]["steps"],
        "trained_method": ckpt["classifier"]["method"],
        "t0": clf.t0, "t": clf.t,
        "finetune_top1": ckpt.get("top1"),
        "finetune_step": int(ckpt["step"]),
        "checkpoint": os.path.abspath(where),
        "data": spec,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "device_used": str(dev),
        "batch_size": batch_size,
        "world_size": ctx.world,
    }
    if files is not None and ctx.main:
        metrics["out"] = files.out
        files.write_json("metrics.json", metrics)
    return metrics


def _flow_to_extract(kind: str, ckpt: Dict[str, Any], raw_weights: bool, model):
    """(flow, its (t, t0, steps, method) defaults, which weights): see extract."""
    if kind == "finetune":
        c = ckpt["classifier"]
        flow = build_classifier(ckpt, model=model).flow
        return flow, (c["t"], c["t0"], c["steps"], c["method"]), "finetuned"
    flow = build_model(ckpt, ema=not raw_weights, model=model)
    weights = "raw" if raw_weights else "ema"
    return prg_velocity(flow, ckpt.get("time_convention", "prg")), (1.0, 0.0, 20, "euler"), weights


def extract(checkpoint: str, data: str, out: str, *, t: Optional[float] = None, t0: Optional[float] = None,
            save_at: Optional[Sequence[float]] = None, ode_steps: Optional[int] = None, method: Optional[str] = None,
            raw_weights: bool = False, batch_size: int = 256, device: str = "auto", progress: bool = False,
            probe: bool = False, knn_k: int = 20, model: Optional[torch.nn.Module] = None,
            force: bool = False) -> Dict[str, Any]:
    """Features of both splits of `data` along the reversed trajectory of a checkpoint's flow,
    written to `out`: a run directory (DIR/features.npz, DIR/metrics.json) or, as before, a file
    FILE.npz (the probe numbers then go to FILE.probe.json). Feature file format: the module doc. A
    pretraining checkpoint gives its EMA network (raw_weights=True: the raw one); a finetuning
    checkpoint its finetuned flow, with its trained segment and solver as defaults. probe=True adds
    linear-probe and k-NN top-1. Returns the metadata (and probe numbers)."""
    if not isinstance(out, str) or not out or (os.path.splitext(out)[1] not in ("", ".npz")):
        raise ValueError(f"--out must be a run directory (no file extension) or name a .npz file, got {out!r}")
    run_dir = not out.endswith(".npz")
    npz = os.path.join(out, "features.npz") if run_dir else out
    if run_dir:
        RunDir(out, None, 0, "extract").claim(force=force)
    else:
        claim_file(out, force)
        if probe:
            claim_file(out[:-len(".npz")] + ".probe.json", force, what="the probe file")
    kind, ckpt = load_model_checkpoint(checkpoint, ("pretrain", "finetune", "flow"))  # the file is read once
    where = checkpoint_file(checkpoint)
    flow, defaults, weights = _flow_to_extract(kind, ckpt, raw_weights, model)
    t, t0, steps, method = (d if v is None else v for v, d in zip((t, t0, ode_steps, method), defaults))
    t0, t, save_at = check_segment(t0, t, save_at)
    save_at = None if save_at is None else list(save_at)
    train, test = (load_data(data, split, augment=None) for split in ("train", "test"))
    check_data_fits(train, ckpt, where, "was trained on")
    dev = resolve_device(device, 0)
    flow = flow.to(dev)
    t_start = time.perf_counter()
    arrays = {}
    for split, d in (("train", train), ("test", test)):
        arrays[f"{split}_features"], arrays[f"{split}_labels"] = extract_features(
            flow, d, t, t0=t0, steps=steps, method=method, save_at=save_at, batch_size=batch_size, device=dev,
            progress=progress)
    meta = {"command": "extract", "checkpoint": os.path.abspath(where), "checkpoint_kind": kind,
            "weights": weights, "data": data,
            "t": t, "t0": t0, "save_at": save_at, "ode_steps": steps, "method": method,
            "feature_shape": list(feature_shape(train.shape, save_at)), "n_train": len(train),
            "n_test": len(test), "wall_time_s": round(time.perf_counter() - t_start, 3)}
    save_features(npz, **arrays, feature_shape=meta["feature_shape"], classes=train.classes, meta=meta)
    if probe:
        meta.update(probe_features(arrays, k=knn_k))
        if not run_dir:
            write_json(out[:-len(".npz")] + ".probe.json", meta)
    if run_dir:  # what is returned (and printed) is what metrics.json holds
        meta["features"] = os.path.abspath(npz)
        write_json(os.path.join(out, "metrics.json"), meta)
    return meta

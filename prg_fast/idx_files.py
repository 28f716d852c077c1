"""IDX files: MNIST and Fashion-MNIST, found on disk and read with numpy (prg_fast.data serves them
as the DATA specs `mnist` and `fashion-mnist`).

A data set is the four files {train,t10k}-{images-idx3,labels-idx1}-ubyte, each plain or gzipped
(`.gz`; the plain file wins when both are there, as in torchvision's raw/ folders, which keep both).
Where they are looked for, in order:

  1. the folder named in the spec (`fashion-mnist:DIR`, the command line's --data-dir DIR): DIR itself,
     DIR/raw, DIR/<name> or DIR/<name>/raw, <name> being the data set's folder names below (so
     torchvision's root, its FashionMNIST/ folder and a folder of the four files all work); nothing
     else is searched when a folder is named;
  2. $PRG_FAST_DATA, a root of data sets: $PRG_FAST_DATA/<name> or $PRG_FAST_DATA/<name>/raw (not the
     root itself: MNIST and Fashion-MNIST files have the same names);
  3. the Debian package's folder (`apt-get install dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist).

IDX layout (big-endian): images are magic 2051, count, rows, columns, then count x rows x columns
bytes; labels are magic 2049, count, then count bytes. A file whose magic, sizes or length do not
match, or a label file whose count differs from its image file's, is refused with the file named:
a data set is read whole or not at all.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

__all__ = ["IdxDataSet", "IDX_DATA_SETS", "ENV_VAR", "find_idx_dir", "read_idx_split", "read_idx", "IMAGES_MAGIC",
           "LABELS_MAGIC"]

ENV_VAR = "PRG_FAST_DATA"
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class IdxDataSet:
    name: str  # the DATA spec
    folders: Tuple[str, ...]  # folder names it goes by (ours first, then torchvision's)
    classes: Tuple[str, ...]
    system_dir: Optional[str]  # where a system package installs it
    package: Optional[str]  # that package (apt)


IDX_DATA_SETS = {
    "fashion-mnist": IdxDataSet(
        "fashion-mnist", ("fashion-mnist", "FashionMNIST"),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
    "mnist": IdxDataSet("mnist", ("mnist", "MNIST"), tuple(str(c) for c in range(10)), None, None),  # no package
}


def _file_names(split: str) -> Tuple[str, str]:
    prefix = SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_file(folder: str, name: str) -> Optional[str]:
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _holds(folder: str) -> bool:
    """Whether `folder` holds all four files of a data set."""
    return all(_find_file(folder, n) for split in SPLIT_PREFIX for n in _file_names(split))


def _candidates(ds: IdxDataSet, root: str, include_root: bool) -> List[str]:
    out = [root, os.path.join(root, "raw")] if include_root else []
    for name in ds.folders:
        out += [os.path.join(root, name), os.path.join(root, name, "raw")]
    return out


def find_idx_dir(name: str, data_dir: Optional[str] = None) -> str:
    """The folder holding data set `name`'s four IDX files (see the module doc for the search
    order); FileNotFoundError naming every place looked at, the accepted layouts and the package
    that installs it when none does."""
    ds = IDX_DATA_SETS[name]
    if data_dir is not None:
        looked = _candidates(ds, data_dir, include_root=True)
    else:
        looked = []
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            looked += _candidates(ds, os.path.expanduser(env), include_root=False)
        if ds.system_dir:
            looked.append(ds.system_dir)
    for folder in looked:
        if _holds(folder):
            return folder
    files = ", ".join(f"{n}[.gz]" for split in SPLIT_PREFIX for n in _file_names(split))
    where = (f"--data-dir {data_dir}" if data_dir is not None
             else f"${ENV_VAR} ({os.environ.get(ENV_VAR) or 'not set'}) or {ds.system_dir}")
    install = f"Install it with `apt-get install {ds.package}` (into {ds.system_dir}), or put" if ds.package else "Put"
    raise FileNotFoundError(
        f"{name}: the IDX files ({files}) are not in {where}; looked in {', '.join(looked)}. {install} them in a "
        f"folder given with --data-dir DIR (or the spec {name}:DIR): DIR itself, DIR/raw, or torchvision's layout "
        f"DIR/{ds.folders[1]}/raw; or under ${ENV_VAR}/{ds.folders[0]}")


def read_idx(path: str, magic: int) -> np.ndarray:
    """The array of one IDX file of unsigned bytes (images (N, rows, cols) for magic 2051, labels
    (N,) for 2049); ValueError naming the file when its magic, sizes or length are wrong or a
    gzipped file is truncated or corrupt."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file (truncated or corrupt: {e})") from e
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + dims)
    what = "images (magic 2051)" if magic == IMAGES_MAGIC else "labels (magic 2049)"
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte header of an IDX file of {what}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: magic number {found}, expected {magic} (an IDX file of {what}); "
                         f"{'the images and labels files may be swapped' if found in (IMAGES_MAGIC, LABELS_MAGIC) else 'not an IDX file'}")
    shape = tuple(int.from_bytes(raw[4 * (i + 1):4 * (i + 2)], "big") for i in range(dims))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected or 0 in shape[1:]:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header says {' x '.join(map(str, shape))} values "
                         f"({expected} bytes with the header): the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(name: str, folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, rows, cols), labels int64 (N,)) of one split ("train" / "test") in `folder`,
    checked: as many labels as images, every label a class of the data set."""
    images_name, labels_name = _file_names(split)
    images_file, labels_file = _find_file(folder, images_name), _find_file(folder, labels_name)
    if images_file is None or labels_file is None:
        raise FileNotFoundError(f"{name}: {folder} lacks {images_name if images_file is None else labels_name}[.gz]")
    images = read_idx(images_file, IMAGES_MAGIC)
    labels = read_idx(labels_file, LABELS_MAGIC).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{name}: {labels_file} holds {len(labels)} labels but {images_file} holds {len(images)} "
                         f"images; the two files of a split must match")
    classes = len(IDX_DATA_SETS[name].classes)
    if len(labels) and int(labels.max()) >= classes:
        raise ValueError(f"{name}: {labels_file} holds label {int(labels.max())}; expected labels 0..{classes - 1}")
    return images, labels

"""Image data sets for pretraining and finetuning, selected by a DATA spec string:

    digits          scikit-learn's bundled 8x8 digits (1,797 images, 1 channel, 17 grey levels),
                    a fixed seeded, stratified split of 1,437 train / 360 test
    cifar10:PATH    the standard `cifar-10-batches-py` pickles (PATH is that folder or its parent)
    folder:PATH     an image-folder tree PATH/{train,test}/<class>/*.png|jpg|jpeg, read with Pillow
    fashion-mnist   Fashion-MNIST's IDX files (60,000 train / 10,000 test, 28x28 grey, 10 classes),
                    read with numpy; `fashion-mnist:DIR` names their folder, else $PRG_FAST_DATA and
                    the Debian package's folder are searched (prg_fast.idx_files)
    mnist           MNIST, the same way (`mnist:DIR`)

Every split is decoded once into a uint8 tensor (N, C, H, W) and kept in memory (also cached per
process), so a training step only indexes, converts to float in [-1, 1] and augments a batch,
vectorised; nothing is decoded per sample and no loader workers are needed on a 2-core machine.
On a GPU the uint8 batch goes over in one asynchronous copy from pinned memory and is converted and
augmented there, random numbers included (drawn from the device's generator, which the trainers
seed per rank and save in their checkpoints, so a resumed run continues the same augmentations).
`class_balanced_subset` picks the seeded labelled subset of a label-scarce finetuning run,
`validation_split` a seeded, stratified validation set carved from a training split.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .idx_files import IDX_DATA_SETS, find_idx_dir, read_idx_split

__all__ = ["Augment", "ImageData", "load_data", "parse_spec", "default_augment", "cache_dir", "class_balanced_subset",
           "validation_split", "with_data_dir", "SPLITS", "DIGITS_SPLIT_SEED", "IDX_DATA_SETS"]

SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0  # the fixed digits split: part of the data definition, never a run's seed
DIGITS_TEST_SIZE = 360
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Augment:
    """Batch augmentation on float images: `hflip` mirrors each image with probability 1/2;
    `crop_padding` > 0 reflect-pads by that many pixels and takes a random crop of the original
    size (the usual CIFAR "pad 4, crop 32")."""

    hflip: bool = False
    crop_padding: int = 0

    def __post_init__(self):
        if not isinstance(self.hflip, bool):
            raise TypeError(f"hflip must be True or False, got {self.hflip!r}")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0, got {self.crop_padding!r}")

    @property
    def active(self) -> bool:
        return self.hflip or self.crop_padding > 0

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment a batch on its own device: every random number is drawn there (from `generator`,
        which must live on x's device, or else from that device's default generator, which the
        trainers seed and save with the run), so a CUDA batch costs no host round trip. The draws
        come in the same order as ever (crop rows, crop columns, flips), so CPU runs are unchanged."""
        if not self.active:
            return x
        if generator is not None and not _same_device(generator.device, x.device):
            raise ValueError(f"generator must live on the batch's device ({x.device}), got a generator on "
                             f"{generator.device}; create it with torch.Generator(device=x.device)")
        b, c, h, w = x.shape
        dev = x.device
        if self.crop_padding:
            p = self.crop_padding
            if p >= h or p >= w:
                raise ValueError(f"crop_padding ({p}) must be smaller than the image size ({h}x{w})")
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
            rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
            cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
            batch = torch.arange(b, device=dev)[:, None, None, None]
            chans = torch.arange(c, device=dev)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.hflip:
            flip = torch.rand(b, generator=generator, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.Generator(device="cuda") reports "cuda" without an index: that is the current device
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


class ImageData(torch.utils.data.Dataset):
    """One split of a data set, decoded: `images` uint8 (N, C, H, W) with values 0..levels,
    `labels` int64 (N,), `classes` the class names. Items and batches are float images in
    [-1, 1]; `augment` is applied to them (use `batch(..., augment=False)` to skip it)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *, levels: int = 255,
                 spec: str = "", split: str = "train", augment: Optional[Augment] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.classes, self.levels = list(classes), int(levels)
        self.spec, self.split = spec, split
        self.augment = augment or Augment()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 0..levels -> float32 in [-1, 1]."""
        return images.float() * (2.0 / self.levels) - 1.0

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x, y = self.batch([index])
        return x[0], int(y[0])

    def batch(self, indices, *, augment: bool = True, device=None,
              generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float32 in [-1, 1] and labels (B,) for the given indices. The uint8
        batch (4x less than float) is gathered on the host and sent in one asynchronous copy from
        pinned memory to a CUDA `device`; conversion and augmentation (random numbers included,
        see Augment) then run on the device, so a step never waits for the host."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        y = self.labels[idx]
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda":
                # a copy from pageable memory is synchronous whatever non_blocking says; the pinned
                # buffers come from torch's caching host allocator, which keeps them alive until
                # the copy has finished
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = self.to_float(x)
        if augment:
            x = self.augment(x, generator)
        return x, y

    def subset(self, indices) -> "ImageData":
        """The images at `indices` (in that order), as an ImageData with the same classes, levels,
        spec, split and augmentation."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got values in [{int(idx.min())}, {int(idx.max())}]")
        return ImageData(self.images[idx], self.labels[idx], self.classes, levels=self.levels, spec=self.spec,
                         split=self.split, augment=self.augment)

    def __repr__(self) -> str:
        return (f"ImageData({self.spec!r}, split={self.split!r}, n={len(self)}, shape={self.shape}, "
                f"classes={self.num_classes}, augment={self.augment})")


def class_balanced_subset(labels, n_per_class: int, seed: int, num_classes: Optional[int] = None) -> torch.Tensor:
    """Indices (sorted, int64) of `n_per_class` examples of every class, drawn without replacement
    by a CPU generator seeded with `seed`: the labelled subset of a label-scarce run. The same
    (labels, N, seed) gives the same subset on every machine; subsets for different N are drawn
    independently (the N = 1 subset need not be inside the N = 2 one).

    labels: 1-D integer labels 0..num_classes-1 (num_classes defaults to max + 1; a class with no
    example at all is an error, as is N larger than the smallest class)."""
    import numbers

    if isinstance(n_per_class, bool) or not isinstance(n_per_class, numbers.Integral) or n_per_class < 1:
        raise ValueError(f"labels_per_class must be an integer >= 1, got {n_per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    n_per_class, seed = int(n_per_class), int(seed)
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.numel() == 0 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.max()) >= k:
        raise ValueError(f"labels hold class {int(y.max())}, but num_classes is {k}")
    counts = torch.bincount(y, minlength=k)
    smallest = int(counts.min())
    if n_per_class > smallest:
        cls = int(counts.argmin())
        raise ValueError(f"labels_per_class={n_per_class} is larger than the smallest class (class {cls} has "
                         f"{smallest} labelled training images); choose labels_per_class <= {smallest}")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(k):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:n_per_class]])
    return torch.sort(torch.cat(picked)).values


def validation_split(labels, size: int, seed: int, num_classes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), both sorted int64: `size` images carved out of a
    training split, stratified (each class gets its share of `size`, the remainder going to the
    first classes in order of their fractional share) and drawn by a CPU generator seeded with
    `seed`, so the same (labels, size, seed) gives the same split everywhere. Every class keeps at
    least one training image."""
    import numbers

    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"validation size must be an integer >= 1, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    y = torch.as_tensor(labels).long()
    if y.dim() != 1 or y.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got shape {tuple(y.shape)}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    counts = torch.bincount(y, minlength=k)
    if size >= len(y):
        raise ValueError(f"a validation split of {size} images leaves no training images ({len(y)} in all)")
    share = counts.double() * size / len(y)
    per_class = share.floor().long()
    order = torch.argsort(share - per_class, descending=True, stable=True)
    per_class[order[:size - int(per_class.sum())]] += 1
    short = torch.nonzero((per_class >= counts) & (counts > 0)).flatten()
    if len(short):
        c = int(short[0])
        raise ValueError(f"a validation split of {size} images takes all {int(counts[c])} images of class {c}; "
                         f"choose a smaller validation size")
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in range(k):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:int(per_class[c])]])
    val = torch.sort(torch.cat(picked)).values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


# -------------------------------------------------------------------------------------------------
# spec parsing


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """'digits' -> ('digits', None); 'cifar10:PATH' / 'folder:PATH' -> (kind, expanded PATH);
    'fashion-mnist' / 'mnist' -> (kind, None), with ':DIR' -> (kind, expanded DIR)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"DATA spec must be a non-empty string, got {spec!r}")
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return "digits", None
    if kind in ("cifar10", "folder") or (kind in IDX_DATA_SETS and sep):
        if not path:
            raise ValueError(f"DATA spec {spec!r}: {kind} needs a path, as in {kind}:PATH")
        return kind, os.path.abspath(os.path.expanduser(path))
    if kind in IDX_DATA_SETS:
        return kind, None
    raise ValueError(f"unknown DATA spec {spec!r}: expected 'digits', 'fashion-mnist[:DIR]', 'mnist[:DIR]', "
                     f"'cifar10:PATH' or 'folder:PATH'")


def with_data_dir(spec: str, data_dir: Optional[str]) -> str:
    """The spec with the folder of a --data-dir option folded in: ('fashion-mnist', DIR) ->
    'fashion-mnist:DIR'; None leaves the spec as it is. Only the IDX data sets take a --data-dir
    (the others name their path in the spec)."""
    if data_dir is None:
        return spec
    kind, path = parse_spec(spec)
    if kind not in IDX_DATA_SETS:
        raise ValueError(f"--data-dir is for {' and '.join(IDX_DATA_SETS)} (where their IDX files are); "
                         f"{spec!r} names its own path or needs none")
    if path is not None:
        raise ValueError(f"--data-dir {data_dir} and the spec {spec!r} both name a folder; give it once")
    return f"{kind}:{data_dir}"


def default_augment(spec: str, split: str = "train") -> Augment:
    """Horizontal flips for natural-image training splits (torchcfm's CIFAR recipe; a mirrored
    garment is still the same garment, so Fashion-MNIST too); nothing for digits and MNIST (a
    mirrored digit is not the same digit) and nothing for test splits."""
    kind, _ = parse_spec(spec)
    return Augment(hflip=(split == "train" and kind not in ("digits", "mnist")))


_CACHE: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, List[str], int]] = {}


def load_data(spec: str, split: str = "train", *, augment: Union[Augment, str, None] = "auto",
              cache: bool = True) -> ImageData:
    """Load one split ("train" or "test") of the data set named by `spec` (see the module doc).

    augment: "auto" (default_augment), None (no augmentation) or an Augment. Decoded splits are
    cached per process (cache=False re-reads)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, path = parse_spec(spec)
    if isinstance(augment, str):
        if augment != "auto":
            raise ValueError(f"augment must be 'auto', None or an Augment, got {augment!r}")
        augment = default_augment(spec, split)
    elif augment is not None and not isinstance(augment, Augment):
        raise TypeError(f"augment must be 'auto', None or an Augment, got {type(augment).__name__}")
    if kind in IDX_DATA_SETS:  # found now: the environment decides where, and the cache is keyed by that
        path = find_idx_dir(kind, path)
    key = (kind, path, split, _stamp(path))
    if not cache or key not in _CACHE:
        loader = _load_idx(kind) if kind in IDX_DATA_SETS else LOADERS[kind]
        _CACHE[key] = loader(path, split)
    images, labels, classes, levels = _CACHE[key]
    return ImageData(images, labels, classes, levels=levels, spec=spec, split=split, augment=augment)


def _stamp(path: Optional[str]):
    # a changed folder (modification time) invalidates the per-process cache
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


# -------------------------------------------------------------------------------------------------
# loaders: each returns (uint8 images (N, C, H, W), int64 labels (N,), class names, levels)


def _load_digits(_path, split):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()  # bundled with scikit-learn: no download
    index = np.arange(len(bunch.target))
    train_idx, test_idx = train_test_split(index, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED,
                                           stratify=bunch.target)
    idx = np.sort(train_idx if split == "train" else test_idx)
    images = torch.from_numpy(bunch.images[idx].astype(np.uint8))[:, None]  # values 0..16
    labels = torch.from_numpy(bunch.target[idx].astype(np.int64))
    return images, labels, [str(c) for c in range(10)], 16


def _load_idx(kind):
    def load(folder, split):
        images, labels = read_idx_split(kind, folder, split)
        return (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels), list(IDX_DATA_SETS[kind].classes),
                255)

    return load


def _load_cifar10(path, split):
    root = path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cifar10: no such directory: {path}")
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise FileNotFoundError(f"cifar10: {root} is not a cifar-10-batches-py folder: missing {', '.join(missing)}")
    data, labels = [], []
    for n in names:
        batch = _unpickle(os.path.join(root, n))
        try:
            arr = np.asarray(batch[b"data"], dtype=np.uint8)
            lab = batch[b"labels"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"cifar10: {os.path.join(root, n)} lacks the 'data'/'labels' entries of a CIFAR-10 batch") from e
        if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32 or len(lab) != arr.shape[0]:
            raise ValueError(f"cifar10: {os.path.join(root, n)} holds data of shape {arr.shape}, expected (N, 3072)")
        data.append(arr)
        labels.append(np.asarray(lab, dtype=np.int64))
    classes = [str(c) for c in range(10)]
    meta = os.path.join(root, "batches.meta")
    if os.path.isfile(meta):
        names_ = _unpickle(meta).get(b"label_names")
        if names_:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names_]
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels)), classes, 255


def _unpickle(file):
    try:
        with open(file, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # a foreign or truncated file can fail in many ways inside pickle
        raise ValueError(f"cifar10: {file} is not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e


def _class_dirs(split_dir):
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))


def _load_folder(path, split):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder: no such directory: {path}")
    split_dir = os.path.join(path, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"folder: expected {split_dir}/<class>/*.png|jpg (an image-folder tree "
                                f"PATH/{{train,test}}/<class>/), but {split_dir} does not exist")
    # class names come from the train split, so train and test labels agree
    train_dir = os.path.join(path, "train")
    classes = _class_dirs(train_dir) if os.path.isdir(train_dir) else _class_dirs(split_dir)
    extra = sorted(set(_class_dirs(split_dir)) - set(classes))
    if extra:
        raise ValueError(f"folder: {split_dir} has classes not in {train_dir}: {extra}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        cdir = os.path.join(split_dir, cls)
        if not os.path.isdir(cdir):
            continue
        names = sorted(n for n in os.listdir(cdir) if n.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(cdir, n) for n in names]
        labels += [label] * len(names)
    if not files:
        raise ValueError(f"folder: no images (*.png, *.jpg, *.jpeg) under {split_dir}/<class>/")
    entry = _cache_entry(split_dir, classes, files)
    out = _cache_read(entry, len(files))
    if out is None:
        out = _stack(split_dir, files, [_decode(f) for f in files])
        _cache_write(entry, out)
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64), classes, 255


LOADERS = {"digits": _load_digits, "cifar10": _load_cifar10, "folder": _load_folder}


def _stack(split_dir, files, arrays) -> np.ndarray:
    """(N, H, W, C) uint8; grey images are repeated to RGB when the folder mixes both."""
    sizes: Dict[Tuple[int, int], str] = {}
    for f, a in zip(files, arrays):
        sizes.setdefault(a.shape[:2], f)
    if len(sizes) > 1:
        examples = "; ".join(f"{h}x{w} (e.g. {f})" for (h, w), f in sizes.items())
        raise ValueError(f"folder: images under {split_dir} have mixed sizes: {examples}; resize them to one size first")
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), h, w, channels), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


def _decode(file):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()
            mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            # no convert() copy when the file already is 8-bit RGB / grey (the common case)
            return np.asarray(im if im.mode == mode else im.convert(mode))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"folder: cannot read image {file}: {e}") from e


def cache_dir() -> Optional[str]:
    """Where decoded folder splits are cached across processes: $PRG_FAST_CACHE (``0`` or ``off``
    disables), default ~/.cache/prg_fast."""
    value = os.environ.get("PRG_FAST_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    return os.path.expanduser(value or os.path.join("~", ".cache", "prg_fast"))


# Decoding is ~0.2 ms of Python-bound work per small image (threads do not help: the GIL), so the
# 50,000 CIFAR-10 training JPEGs take ~10 s; the decoded array is cached on disk, keyed by the file
# list and the directories' modification times, which brings a repeated load to well under a second.


def _cache_entry(split_dir, classes, files) -> Optional[str]:
    import hashlib

    folder = cache_dir()
    if not folder:
        return None
    dirs = [split_dir] + [os.path.join(split_dir, c) for c in classes if os.path.isdir(os.path.join(split_dir, c))]
    key = repr((os.path.realpath(split_dir), classes, [os.stat(d).st_mtime_ns for d in dirs], files))
    return os.path.join(folder, "folder-" + hashlib.sha1(key.encode()).hexdigest()[:24] + ".npy")


def _cache_read(entry, n) -> Optional[np.ndarray]:
    if not entry or not os.path.isfile(entry):
        return None
    try:
        out = np.load(entry, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable cache entry: decode again and overwrite it
    return out if out.dtype == np.uint8 and out.ndim == 4 and out.shape[0] == n else None


def _cache_write(entry, out: np.ndarray) -> None:
    if not entry:
        return
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tmp = f"{entry}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, out)
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only home is no reason to fail: the next run decodes again

"""prg_fast.data: digits (fixed split), cifar10 pickles and image folders (built here in tmp_path),
augmentations, and the errors for bad DATA specs / paths / folders."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from prg_fast.data import Augment, ImageData, class_balanced_subset, load_data, parse_spec
from prg_fast.training.runs import rng_state, set_rng_state


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("PRG_FAST_CACHE", "0")  # tests must not write into ~/.cache


def test_digits_split_and_range():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert len(train) == 1437 and len(test) == 360
    assert train.shape == (1, 8, 8) and train.num_classes == 10
    x, y = train.batch(range(len(train)))
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y, minlength=10) + torch.bincount(test.labels, minlength=10),
                       torch.bincount(torch.from_numpy(load_digits().target)))
    # every class in the test split, the split fixed (independent of any global seed)
    assert set(test.labels.tolist()) == set(range(10))
    torch.manual_seed(123)
    again = load_data("digits", "test", cache=False)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert not train.augment.active  # mirrored digits are not digits


def test_digits_item_and_values():
    ds = load_data("digits", "train")
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and isinstance(y, int)
    raw = torch.from_numpy(load_digits().images).float()
    # the stored uint8 grey levels 0..16 map exactly onto [-1, 1]
    match = ((raw / 8 - 1) - x[0]).abs().flatten(1).max(1).values
    assert match.min() == 0.0


def _write_cifar(root, n_per_batch=4):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=n_per_batch))
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": arr, b"labels": labels}, f)
        batches[name] = (arr, labels)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def test_cifar10_pickles(tmp_path):
    batches = _write_cifar(str(tmp_path / "cifar-10-batches-py"))
    for spec in [f"cifar10:{tmp_path}", f"cifar10:{tmp_path}/cifar-10-batches-py"]:
        train = load_data(spec, "train", cache=False)
        test = load_data(spec, "test", cache=False)
        assert len(train) == 20 and len(test) == 4 and train.shape == (3, 32, 32)
        assert train.classes == [f"c{i}" for i in range(10)]
        arr, labels = batches["test_batch"]
        assert torch.equal(test.images, torch.from_numpy(arr.reshape(-1, 3, 32, 32)))
        assert test.labels.tolist() == labels
        assert train.augment.hflip and not test.augment.active  # flips for natural-image training


def _write_folder(root, size=(6, 6), mode="RGB", ext="png", per_class=3, classes=("cat", "dog")):
    rng = np.random.default_rng(1)
    written = {}
    for split in ("train", "test"):
        for cls in classes:
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                path = os.path.join(d, f"{i:03d}.{ext}")
                Image.fromarray(arr, mode).save(path)
                written[path] = arr
    return written


def test_folder_png_exact(tmp_path):
    written = _write_folder(str(tmp_path))
    ds = load_data(f"folder:{tmp_path}", "train", cache=False)
    assert len(ds) == 6 and ds.shape == (3, 6, 6) and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = written[os.path.join(str(tmp_path), "train", "cat", "000.png")]
    assert torch.equal(ds.images[0], torch.from_numpy(first).permute(2, 0, 1))
    x, _ = ds.batch([0], augment=False)
    torch.testing.assert_close(x[0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)


def test_folder_grayscale_jpg(tmp_path):
    _write_folder(str(tmp_path), mode="L", ext="jpg")
    ds = load_data(f"folder:{tmp_path}", "test", cache=False)
    assert ds.shape == (1, 6, 6) and len(ds) == 6


def test_folder_disk_cache_roundtrip(tmp_path, monkeypatch):
    _write_folder(str(tmp_path / "data"))
    monkeypatch.setenv("PRG_FAST_CACHE", str(tmp_path / "cache"))
    a = load_data(f"folder:{tmp_path}/data", "train", cache=False)
    assert len(os.listdir(tmp_path / "cache")) == 1
    b = load_data(f"folder:{tmp_path}/data", "train", cache=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # a new file changes the key: the cache is not served stale
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "data" / "train" / "dog" / "999.png")
    c = load_data(f"folder:{tmp_path}/data", "train", cache=False)
    assert len(c) == 7


def test_augment_flip_and_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5).repeat(32, 1, 1, 1)
    flipped = Augment(hflip=True)(x, g)
    same = [(flipped[i] == x[i]).all().item() for i in range(len(x))]
    mirrored = [(flipped[i] == x[i].flip(-1)).all().item() for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    cropped = Augment(crop_padding=2)(x, g)
    assert cropped.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):  # each output is some 5x5 window of its padded input
        assert any(torch.equal(cropped[i], padded[i, :, a:a + 5, b:b + 5]) for a in range(5) for b in range(5))
    assert not torch.equal(cropped, x)
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)


def test_parse_spec():
    assert parse_spec("digits") == ("digits", None)
    kind, path = parse_spec("folder:~/x")
    assert kind == "folder" and path == os.path.expanduser("~/x")


def test_bad_specs_and_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown DATA spec 'svhn'"):
        load_data("svhn")
    with pytest.raises(ValueError, match="cifar10 needs a path"):
        load_data("cifar10")
    with pytest.raises(ValueError, match="split must be one of"):
        load_data("digits", "val")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_data(f"folder:{tmp_path}/missing")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_data(f"cifar10:{tmp_path}/missing")
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="train.*does not exist"):
        load_data(f"folder:{tmp_path}")


def test_empty_folder(tmp_path):
    os.makedirs(tmp_path / "train" / "cat")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        load_data(f"folder:{tmp_path}", cache=False)


def test_mixed_sizes(tmp_path):
    _write_folder(str(tmp_path))
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match="mixed sizes: 6x6 .*7x9"):
        load_data(f"folder:{tmp_path}", cache=False)


def test_unreadable_image_and_pickle(tmp_path):
    _write_folder(str(tmp_path / "f"))
    (tmp_path / "f" / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_data(f"folder:{tmp_path}/f", cache=False)
    _write_cifar(str(tmp_path / "c"))
    (tmp_path / "c" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable CIFAR-10 pickle"):
        load_data(f"cifar10:{tmp_path}/c", "test", cache=False)


# -------------------------------------------------------------------------------------------------
# class-balanced labelled subsets (finetune --labels-per-class)


def test_class_balanced_subset_counts_and_determinism():
    labels = load_data("digits", "train").labels
    for n in (1, 2, 5, 10):
        idx = class_balanced_subset(labels, n, seed=3)
        assert idx.dtype == torch.int64 and idx.shape == (10 * n,)
        assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), n))
        assert len(set(idx.tolist())) == 10 * n  # without replacement
        assert torch.equal(idx, torch.sort(idx).values)
        assert torch.equal(idx, class_balanced_subset(labels, n, seed=3))  # same seed, same subset
    assert not torch.equal(class_balanced_subset(labels, 5, seed=0), class_balanced_subset(labels, 5, seed=1))
    # the whole of the smallest class is allowed, and then every one of its images is taken
    smallest = int(torch.bincount(labels).min())
    idx = class_balanced_subset(labels, smallest, seed=0)
    cls = int(torch.bincount(labels).argmin())
    assert torch.equal(idx[labels[idx] == cls], torch.nonzero(labels == cls).flatten())


def test_class_balanced_subset_is_independent_of_the_label_dtype():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    a = class_balanced_subset(labels, 2, seed=5)
    b = class_balanced_subset(labels.numpy().astype(np.int32), np.int64(2), seed=np.int64(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n, match", [(0, "labels_per_class must be an integer >= 1"),
                                      (-2, "labels_per_class must be an integer >= 1"),
                                      (True, "labels_per_class must be an integer >= 1"),
                                      (1.0, "labels_per_class must be an integer >= 1"),
                                      (4, r"larger than the smallest class \(class 1 has 3")])
def test_class_balanced_subset_errors(n, match):
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=match):
        class_balanced_subset(labels, n, seed=0)


def test_class_balanced_subset_bad_labels():
    with pytest.raises(ValueError, match="seed"):
        class_balanced_subset(torch.tensor([0, 1]), 1, seed=-1)
    with pytest.raises(ValueError, match="1-D integer"):
        class_balanced_subset(torch.tensor([0.0, 1.0]), 1, seed=0)
    with pytest.raises(ValueError, match="smallest class \\(class 2 has 0"):
        class_balanced_subset(torch.tensor([0, 1]), 1, seed=0, num_classes=3)  # a class with no example
    with pytest.raises(ValueError, match="num_classes"):
        class_balanced_subset(torch.tensor([0, 3]), 1, seed=0, num_classes=2)


def test_image_data_subset():
    train = load_data("digits", "train", augment=Augment(hflip=True))
    idx = class_balanced_subset(train.labels, 2, seed=0)
    sub = train.subset(idx)
    assert len(sub) == 20 and sub.classes == train.classes and sub.levels == train.levels
    assert sub.augment == train.augment and sub.spec == train.spec and sub.split == "train"
    assert torch.equal(sub.images, train.images[idx]) and torch.equal(sub.labels, train.labels[idx])
    with pytest.raises(IndexError, match="indices must lie in"):
        train.subset([0, len(train)])


# -------------------------------------------------------------------------------------------------
# augmentation on the batch's device


def _old_augment(aug: Augment, x: torch.Tensor, generator) -> torch.Tensor:
    """The augmentation as it was before it moved to the device (random numbers drawn on the CPU,
    index tensors copied over): the oracle for the draw order and the result on the CPU."""
    b, _, h, w = x.shape
    if aug.crop_padding:
        p = aug.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if aug.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@pytest.mark.parametrize("aug", [Augment(hflip=True), Augment(crop_padding=2), Augment(hflip=True, crop_padding=1)])
def test_augment_matches_the_previous_semantics_on_the_cpu(aug):
    x = torch.randn(17, 3, 6, 6)
    for seed in range(3):
        new = aug(x, torch.Generator().manual_seed(seed))
        old = _old_augment(aug, x, torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)
    # and with the global generator (what the trainers use: no generator passed)
    torch.manual_seed(11)
    new = aug(x)
    torch.manual_seed(11)
    assert torch.equal(new, _old_augment(aug, x, None))


def test_augment_flip_probability_and_crop_offsets():
    n, p = 4000, 2
    x = torch.arange(n * 5 * 5, dtype=torch.float32).reshape(n, 1, 5, 5)
    flipped = Augment(hflip=True)(x, torch.Generator().manual_seed(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    same = (flipped == x).flatten(1).all(1)
    assert bool((mirrored ^ same).all())  # every image is either mirrored or untouched (none symmetric here)
    # Binomial(4000, 1/2): sd 31.6; six sd is a bound a correct coin passes essentially always
    assert abs(int(mirrored.sum()) - n // 2) < 6 * 31.7
    cropped = Augment(crop_padding=p)(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    # the window's top-left corner in the padded image, recovered from its first pixel
    seen = set()
    for i in range(0, n, 7):
        where = [(a, b) for a in range(2 * p + 1) for b in range(2 * p + 1)
                 if torch.equal(cropped[i], padded[i, :, a:a + 5, b:b + 5])]
        assert len(where) >= 1
        seen.update(where)
    assert seen == {(a, b) for a in range(2 * p + 1) for b in range(2 * p + 1)}  # every offset occurs


def test_augment_is_deterministic_under_a_seed_and_resumes_exactly():
    aug = Augment(hflip=True, crop_padding=2)
    x = torch.randn(32, 3, 8, 8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(aug(x, g1), aug(x, g2))
    assert not torch.equal(aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(6)))
    # a generator's state saved mid-run and restored continues the same stream
    g = torch.Generator().manual_seed(9)
    aug(x, g)
    state = g.get_state()
    straight = [aug(x, g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    assert all(torch.equal(a, aug(x, g2)) for a in straight)
    # the trainers draw from the device's default generator, saved and restored by rng_state /
    # set_rng_state with the checkpoint: the same continuation after a restore
    dev = torch.device("cpu")
    torch.manual_seed(123)
    aug(x)
    saved = rng_state(dev)
    straight = [aug(x) for _ in range(3)]
    torch.manual_seed(999)  # a different stream in between, as a new process would have
    set_rng_state(saved, dev)
    assert all(torch.equal(a, aug(x)) for a in straight)


def test_batch_augments_on_the_cpu_as_before():
    data = load_data("digits", "train", augment=Augment(hflip=True, crop_padding=1))
    idx = list(range(0, 64))
    x, y = data.batch(idx, device="cpu", generator=torch.Generator().manual_seed(0))
    plain = data.to_float(data.images[idx])
    assert torch.equal(x, _old_augment(data.augment, plain, torch.Generator().manual_seed(0)))
    assert torch.equal(y, data.labels[idx])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device-side augmentation)")
def test_augment_on_cuda_draws_on_the_device():
    dev = torch.device("cuda")
    data = load_data("digits", "train", augment=Augment(hflip=True, crop_padding=1))
    idx = list(range(64))
    g = torch.Generator(device=dev).manual_seed(0)
    x, y = data.batch(idx, device=dev, generator=g)
    assert x.device.type == "cuda" and y.device.type == "cuda"
    # the same draws on the device's generator, applied to the same batch on the device
    ref = data.augment(data.to_float(data.images[idx].to(dev)), torch.Generator(device=dev).manual_seed(0))
    assert torch.equal(x, ref)
    assert torch.equal(y.cpu(), data.labels[idx])
    # every image is a window of its padded original, flipped or not (the CPU semantics)
    plain = torch.nn.functional.pad(data.to_float(data.images[idx]), (1, 1, 1, 1), mode="reflect")
    xc = x.cpu()
    for i in range(64):
        assert any(torch.equal(xc[i], w) or torch.equal(xc[i], w.flip(-1))
                   for w in (plain[i, :, a:a + 8, b:b + 8] for a in range(3) for b in range(3)))
    with pytest.raises(ValueError, match="generator must live on the batch's device"):
        data.batch(idx, device=dev, generator=torch.Generator().manual_seed(0))
    # no step of the batch path waits for the device: torch raises on any synchronising call
    # (a copy from pageable memory, a .item(), ...) in sync debug mode "error"
    data.batch(idx, device=dev)  # warm-up: first pinned allocation, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        data.batch(list(range(64, 128)), device=dev)
        data.batch(list(range(64, 128)), device=dev, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")

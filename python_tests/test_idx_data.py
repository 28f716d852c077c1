"""fashion-mnist / mnist (prg_fast.idx_files through prg_fast.data): IDX files written here, plain and
gzipped, in every accepted layout; the search order (--data-dir, $PRG_FAST_DATA, the Debian folder);
the errors for missing, truncated and corrupt files; the seeded validation split; --data-dir on the
command line; and the real Fashion-MNIST files when the Debian package is installed."""
import gzip
import os

import numpy as np
import pytest
import torch

from prg_fast import idx_files
from prg_fast.cli import main
from prg_fast.data import load_data, parse_spec, validation_split, with_data_dir
from prg_fast.idx_files import IDX_DATA_SETS, find_idx_dir, read_idx

N_TRAIN, N_TEST, SIZE = 30, 10, 6


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PRG_FAST_DATA", raising=False)


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: str, data: bytes, gz: bool) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_idx_set(folder: str, gz: bool = True, seed: int = 0):
    """The four IDX files of a small 10-class data set in `folder`; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        images = rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10  # every class, N_TRAIN / 10 images each
        rng.shuffle(labels)
        _write(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), _idx_bytes(images, 2051), gz)
        _write(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), _idx_bytes(labels, 2049), gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_files_exactly(tmp_path, gz):
    arrays = write_idx_set(str(tmp_path), gz=gz)
    for split in ("train", "test"):
        ds = load_data(f"fashion-mnist:{tmp_path}", split, cache=False)
        images, labels = arrays[split]
        assert ds.images.shape == (len(images), 1, SIZE, SIZE) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), images)
        assert np.array_equal(ds.labels.numpy(), labels) and ds.labels.dtype == torch.int64
        assert ds.classes == list(IDX_DATA_SETS["fashion-mnist"].classes) and ds.levels == 255
        x, _ = ds.batch(range(len(ds)), augment=False)
        assert np.array_equal(x[:, 0].numpy(), images.astype(np.float32) * (2 / 255) - 1)
    # garments may be mirrored, digits not
    assert load_data(f"fashion-mnist:{tmp_path}", "train").augment.hflip
    assert not load_data(f"mnist:{tmp_path}", "train").augment.hflip
    assert load_data(f"mnist:{tmp_path}", "train").classes == [str(c) for c in range(10)]


def test_torchvision_layouts_and_plain_files_first(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    plain = write_idx_set(str(raw), gz=False, seed=1)
    write_idx_set(str(raw), gz=True, seed=2)  # torchvision keeps both; the plain files are read
    for folder in (tmp_path, tmp_path / "FashionMNIST", raw):
        assert find_idx_dir("fashion-mnist", str(folder)) == str(raw)
        ds = load_data(f"fashion-mnist:{folder}", "test", cache=False)
        assert np.array_equal(ds.images[:, 0].numpy(), plain["test"][0])
    # MNIST's torchvision folder is not Fashion-MNIST's
    with pytest.raises(FileNotFoundError):
        find_idx_dir("mnist", str(tmp_path))


def test_search_order_env_before_debian(tmp_path, monkeypatch):
    # $PRG_FAST_DATA is a root of data sets: <root>/fashion-mnist (or torchvision's FashionMNIST/raw)
    write_idx_set(str(tmp_path / "fashion-mnist"))
    monkeypatch.setenv("PRG_FAST_DATA", str(tmp_path))
    assert find_idx_dir("fashion-mnist") == str(tmp_path / "fashion-mnist")
    assert len(load_data("fashion-mnist", "train", cache=False)) == N_TRAIN
    # files at the root itself are not taken: MNIST and Fashion-MNIST files have the same names
    monkeypatch.setitem(IDX_DATA_SETS, "fashion-mnist", IDX_DATA_SETS["fashion-mnist"].__class__(
        "fashion-mnist", ("fashion-mnist", "FashionMNIST"), IDX_DATA_SETS["fashion-mnist"].classes,
        str(tmp_path / "debian"), "dataset-fashion-mnist"))
    write_idx_set(str(tmp_path / "debian"), seed=3)
    monkeypatch.setenv("PRG_FAST_DATA", str(tmp_path / "debian"))  # holds the files at its root only
    assert find_idx_dir("fashion-mnist") == str(tmp_path / "debian")  # found as the system folder
    # a named folder is the only place looked at
    with pytest.raises(FileNotFoundError):
        find_idx_dir("fashion-mnist", str(tmp_path / "nowhere"))


def test_missing_files_name_the_package_and_layouts(tmp_path):
    write_idx_set(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as e:
        load_data(f"fashion-mnist:{tmp_path}", "train", cache=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "FashionMNIST/raw" in msg and "--data-dir" in msg
    assert "t10k-labels-idx1-ubyte[.gz]" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_data(f"mnist:{tmp_path / 'empty'}", "train", cache=False)


def _corrupt(folder, name, data: bytes, gz=True):
    _write(os.path.join(folder, name), data, gz)


@pytest.mark.parametrize("case,match", [
    ("swapped", "magic number 2049, expected 2051.*swapped"),
    ("not_idx", "magic number .* not an IDX file"),
    ("truncated", "truncated or corrupt"),
    ("trailing", "truncated or corrupt"),
    ("short_header", "shorter than the 16-byte header"),
    ("bad_gzip", "not a readable gzip file"),
    ("count_mismatch", "holds 29 labels but .* holds 30 images"),
    ("bad_label", "holds label 10; expected labels 0..9"),
])
def test_corrupt_files_are_refused(tmp_path, case, match):
    arrays = write_idx_set(str(tmp_path))
    images, labels = arrays["train"]
    img, lab = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    good = _idx_bytes(images, 2051)
    if case == "swapped":
        _corrupt(tmp_path, img, _idx_bytes(labels, 2049))
    elif case == "not_idx":
        _corrupt(tmp_path, img, b"\x89PNG" + good[4:])
    elif case == "truncated":
        _corrupt(tmp_path, img, good[:-7])
    elif case == "trailing":
        _corrupt(tmp_path, img, good + b"\x00")
    elif case == "short_header":
        _corrupt(tmp_path, img, good[:10])
    elif case == "bad_gzip":
        with open(tmp_path / (img + ".gz"), "rb") as f:
            zipped = f.read()
        with open(tmp_path / (img + ".gz"), "wb") as f:
            f.write(zipped[: len(zipped) // 2])
    elif case == "count_mismatch":
        _corrupt(tmp_path, lab, _idx_bytes(labels[:-1], 2049))
    elif case == "bad_label":
        bad = labels.copy()
        bad[3] = 10
        _corrupt(tmp_path, lab, _idx_bytes(bad, 2049))
    for _ in range(2):  # nothing partial is kept: the second load fails the same way
        with pytest.raises(ValueError, match=match):
            load_data(f"fashion-mnist:{tmp_path}", "train")


def test_read_idx_shapes(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write(str(tmp_path / "x"), _idx_bytes(arr, 2051), gz=False)
    assert np.array_equal(read_idx(str(tmp_path / "x"), 2051), arr)


def test_validation_split_is_stratified_and_seeded():
    labels = torch.arange(1000) % 10
    labels[:100] = 3  # an uneven class
    train, val = validation_split(labels, 100, seed=5)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(set(train.tolist()) | set(val.tolist())) == 1000
    counts, total = torch.bincount(labels[val], minlength=10), torch.bincount(labels, minlength=10)
    assert torch.all((counts.double() - total.double() / 10).abs() <= 1)  # each class its share, rounded
    again_train, again_val = validation_split(labels, 100, seed=5)
    assert torch.equal(again_val, val) and torch.equal(again_train, train)
    assert not torch.equal(validation_split(labels, 100, seed=6)[1], val)
    with pytest.raises(ValueError, match="leaves no training images"):
        validation_split(labels, 1000, seed=0)
    with pytest.raises(ValueError, match="takes all 1 images of class 1"):
        validation_split(torch.tensor([0, 0, 0, 1]), 3, seed=0)


def test_specs_and_data_dir():
    assert parse_spec("fashion-mnist") == ("fashion-mnist", None)
    assert parse_spec("MNIST:/x") == ("mnist", "/x")
    assert with_data_dir("fashion-mnist", "/d") == "fashion-mnist:/d"
    assert with_data_dir("digits", None) == "digits"
    with pytest.raises(ValueError, match="--data-dir is for fashion-mnist and mnist"):
        with_data_dir("digits", "/d")
    with pytest.raises(ValueError, match="both name a folder"):
        with_data_dir("mnist:/a", "/d")
    with pytest.raises(ValueError, match="fashion-mnist"):
        parse_spec("fmnist")


def test_cli_data_dir(tmp_path, capsys):
    # --data-dir goes into the spec before the command runs: an empty folder is reported as such
    rc = main(["extract", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), "--checkpoint",
               str(tmp_path / "none"), "--out", str(tmp_path / "feats.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data-dir is" not in err
    rc = main(["evaluate", "--data", "digits", "--data-dir", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert rc == 2 and "--data-dir is for fashion-mnist and mnist" in capsys.readouterr().err


DEBIAN = IDX_DATA_SETS["fashion-mnist"].system_dir


@pytest.mark.skipif(not idx_files._holds(DEBIAN),
                    reason=f"the real Fashion-MNIST files are not in {DEBIAN} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, test = load_data("fashion-mnist", "train"), load_data("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000 and train.shape == test.shape == (1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0

"""prg_fast.training.rundir: a command writes only into a new or empty folder, its own run, or (with
--force) an unrelated non-empty folder -- never into another command's run or over an existing file;
a run that fails before its first step leaves nothing behind; unreadable checkpoints are described in
prg_fast's words; input mismatches are caught before training with the numbers in the message."""
import json
import os

import pytest
import torch

from prg_fast.cli import main
from prg_fast.training.evaluate import evaluate, extract
from prg_fast.training.finetune import finetune
from prg_fast.training.pretrain import pretrain
from prg_fast.training.rundir import CheckpointError, RunDir, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = dict(data="digits", path="icfm", batch_size=16, warmup=0, log_every=1, num_samples=1, sample_steps=1,
             progress=False, device="cpu")


class RGBNet(torch.nn.Module):
    """A velocity network for 3-channel images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, t, x):
        return self.conv(x)


def test_claim_accepts_new_empty_and_own_folders(tmp_path):
    assert RunDir(str(tmp_path / "new"), "prg_fast.a", 1, "a").claim() is None
    assert not os.path.exists(tmp_path / "new")  # claiming makes nothing; the first write does
    (tmp_path / "empty").mkdir()
    assert RunDir(str(tmp_path / "empty"), "prg_fast.a", 1, "a").claim() is None
    own = RunDir(str(tmp_path / "own"), "prg_fast.a", 1, "a")
    own.write_json("metrics.json", {"command": "a", "status": "running"})  # before its first checkpoint
    assert own.claim() is None
    own.save({"step": 2})
    assert own.claim()["step"] == 2


def test_claim_refuses_other_runs_files_and_foreign_folders(tmp_path):
    other = RunDir(str(tmp_path / "other"), "prg_fast.finetune", 1, "finetune")
    other.save({"step": 1})
    with pytest.raises(CheckpointError, match="a `prg-fast finetune` run"):
        RunDir(other.out, None, 0, "extract").claim()
    evaluated = RunDir(str(tmp_path / "ev"), None, 0, "evaluate")
    evaluated.write_json("metrics.json", {"command": "evaluate"})
    with pytest.raises(FileExistsError, match="run directory of `prg-fast evaluate`"):
        RunDir(evaluated.out, None, 0, "extract").claim(force=True)  # --force never reaches another run
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file"):
        RunDir(str(tmp_path / "file"), "prg_fast.a", 1, "a").claim()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="non-empty folder that prg-fast did not make.*--force"):
        RunDir(str(tmp_path / "mine"), "prg_fast.a", 1, "a").claim()
    assert RunDir(str(tmp_path / "mine"), "prg_fast.a", 1, "a").claim(force=True) is None


def test_extract_never_overwrites_another_run_or_a_file(tmp_path, capsys):
    run = tmp_path / "ft"
    RunDir(str(run), "prg_fast.finetune", 1, "finetune").save({"step": 1})
    (run / "metrics.json").write_text('{"top1": 0.9}')
    # refused before the checkpoint given is even read
    assert main(["extract", "--data", "digits", "--checkpoint", str(tmp_path / "none"), "--out", str(run)]) == 2
    assert "a `prg-fast finetune` run" in capsys.readouterr().err
    assert json.load(open(run / "metrics.json")) == {"top1": 0.9}
    (tmp_path / "f.npz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists.*--force"):
        extract(str(tmp_path / "none"), "digits", str(tmp_path / "f.npz"))
    assert (tmp_path / "f.npz").read_bytes() == b"old"
    with pytest.raises(CheckpointError, match="a `prg-fast finetune` run"):
        evaluate(str(run), out=str(run))


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["pretrain", "--data", "digits", "--steps", "1", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and "Traceback" not in err


def test_model_data_mismatch_is_caught_before_training_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"RGBNet \(its first convolution reads 3 channels\) cannot read digits's "
                                         r"1x8x8 images"):
        pretrain(**QUICK, steps=2, out=str(out), model=RGBNet())
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match="cannot read digits's 1x8x8 images"):
        finetune(data="digits", steps=1, batch_size=16, ode_steps=1, out=str(out), model=RGBNet(), progress=False,
                 device="cpu")
    assert not os.path.exists(out)


def test_unreadable_checkpoints_are_described(tmp_path):
    (tmp_path / "rand.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path / "rand.pt"))
    assert "binary data of an unknown kind" in str(e.value) and "weights_only" not in str(e.value)
    (tmp_path / "text.pt").write_text("hello world\nsecond line\n")
    with pytest.raises(CheckpointError, match=r"it is a text file \(it starts with 'hello world'\)"):
        read_checkpoint(str(tmp_path / "text.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="an empty file"):
        read_checkpoint(str(tmp_path / "empty.pt"))


def test_a_foreign_model_on_a_unet_checkpoint_blames_the_model(pretrained, tmp_path):
    class Net(RGBNet):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    with pytest.raises(ValueError, match=r"model= / --model: the network given \(Net\) does not fit this checkpoint, "
                                         r"which holds prg_fast's UNet.*drop --model"):
        finetune(data="digits", checkpoint=pretrained, steps=1, batch_size=16, ode_steps=1, out=str(tmp_path / "x"),
                 model=Net(), progress=False, device="cpu")
    assert not os.path.exists(tmp_path / "x")

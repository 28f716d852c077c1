"""`prg-fast finetune` / `evaluate`: learning, exact re-evaluation, resume, and bad inputs.

A tiny pretraining checkpoint is made once per session (conftest's `pretrained`); the finetuning
runs are short CPU runs (tiny UNet on 8x8 digits, 2 Euler steps)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from prg_fast import cli
from prg_fast.training.finetune import (FINETUNE_FORMAT, FinetuneConfig, build_classifier, evaluate, finetune,
                               load_finetune_checkpoint)
from prg_fast.training.pretrain import CheckpointError, build_model, load_checkpoint

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(data="digits", batch_size=64, ode_steps=2, method="euler", progress=False, log_every=5)


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    """One real (short) finetuning run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("ft") / "run"
    torch.set_num_threads(1)
    result = finetune(checkpoint=pretrained, out=str(out), steps=40, lr=2e-3, beta=0.1, warmup=4, **FAST)
    return str(out), result


@pytest.mark.slow
def test_finetune_beats_chance_by_a_wide_margin(finetuned):
    out, result = finetuned
    chance = 0.1
    assert result.metrics["top1"] >= chance + 0.7, result.metrics
    assert result.step == 40
    # the loss went down, and the flow really was trained (not only the head)
    assert result.metrics["loss"] < result.metrics["loss_start"]


def test_flow_and_head_are_both_trained(finetuned, pretrained):
    out, result = finetuned
    ema = build_model(load_checkpoint(pretrained), ema=True)
    changed = [not torch.equal(a, b) for a, b in zip(ema.state_dict().values(),
                                                    result.classifier.flow.state_dict().values())]
    assert sum(changed) > 0.9 * len(changed)


def test_outputs_metrics_and_checkpoint(finetuned, pretrained):
    out, result = finetuned
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("top1", "loss", "ce", "fm", "train_top1", "step", "wall_time_s"):
        assert key in metrics
    # the arguments used are in the same flat object
    assert metrics["ode_steps"] == 2 and metrics["method"] == "euler" and metrics["beta"] == 0.1
    assert metrics["t0"] == 0.0 and metrics["t"] == 1.0 and metrics["checkpoint"] == os.path.abspath(pretrained)
    assert metrics["top1"] == result.metrics["top1"]
    assert metrics["fm"] > 0  # the beta term was computed
    ckpt = load_finetune_checkpoint(out)
    assert ckpt["format"] == FINETUNE_FORMAT and ckpt["step"] == 40
    assert ckpt["pretrain"]["weights"] == "ema" and ckpt["top1"] == metrics["top1"]
    assert ckpt["classifier"] == {"t0": 0.0, "t": 1.0, "save_at": None, "steps": 2, "method": "euler"}
    assert open(os.path.join(out, "log.csv")).readline().startswith("step,loss,ce,fm,train_top1")
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # atomic writes leave nothing behind


def test_evaluate_reproduces_the_final_number(finetuned):
    out, result = finetuned
    m = evaluate(out, "digits")
    assert m["ode_steps"] == 2 and m["method"] == "euler"
    assert m["top1"] == result.metrics["top1"]
    assert m["correct"] == round(result.metrics["top1"] * 360)
    # other batch sizes give the same number (per-sample computation)
    assert evaluate(out, "digits", batch_size=37)["top1"] == result.metrics["top1"]


@pytest.mark.slow
def test_evaluate_cli_other_step_count(finetuned, capsys):
    out, result = finetuned
    assert cli.main(["evaluate", "--data", "digits", "--checkpoint", out, "--ode-steps", "6", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.load(open(os.path.join(out, "evaluate-euler-6", "metrics.json")))
    assert printed == written
    assert written["ode_steps"] == 6 and written["trained_ode_steps"] == 2
    # the same weights, integrated with other steps: the top-1 is computed anew
    clf = build_classifier(load_finetune_checkpoint(out), steps=6)
    from prg_fast.data import load_data
    from prg_fast.training.evaluate import top1_accuracy

    assert written["top1"] == top1_accuracy(clf, load_data("digits", "test"))


def _states(result):
    return {**{"flow." + k: v for k, v in result.classifier.flow.state_dict().items()},
            **{"head." + k: v for k, v in result.classifier.head.state_dict().items()}}


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(pretrained, tmp_path):
    # beta > 0 uses random t and noise, so this also checks that the random state is restored
    common = dict(checkpoint=pretrained, lr=1e-3, beta=0.5, warmup=0, schedule="constant", ckpt_every=100, **FAST)
    straight = finetune(out=str(tmp_path / "a"), steps=6, **common)
    first = finetune(out=str(tmp_path / "b"), steps=3, **common)
    assert first.step == 3
    resumed = finetune(out=str(tmp_path / "b"), steps=6, **common)
    assert resumed.metrics["resumed_from_step"] == 3 and resumed.step == 6
    a, b = _states(straight), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["top1"] == straight.metrics["top1"]
    assert resumed.history[0][0] == 3 and resumed.history[-1][0] == 6  # the first run's log is kept
    # a finished run asked again trains nothing and reports the same number
    again = finetune(out=str(tmp_path / "b"), steps=6, **common)
    assert again.step == 6 and again.metrics["top1"] == straight.metrics["top1"]


@pytest.mark.slow
def test_resume_refuses_other_arguments(pretrained, tmp_path):
    common = dict(checkpoint=pretrained, out=str(tmp_path / "r"), **FAST)
    finetune(steps=2, **common)
    with pytest.raises(CheckpointError, match="t0"):
        finetune(steps=4, t0=0.25, **common)
    with pytest.raises(CheckpointError, match="freeze_flow"):
        finetune(steps=4, freeze_flow=True, **common)


def test_freeze_flow_trains_the_head_only(pretrained, tmp_path):
    r = finetune(checkpoint=pretrained, out=str(tmp_path / "h"), steps=4, freeze_flow=True, beta=1.0, **FAST)
    ema = build_model(load_checkpoint(pretrained), ema=True)
    for a, b in zip(ema.state_dict().values(), r.classifier.flow.state_dict().values()):
        assert torch.equal(a, b)
    assert r.metrics["beta_used"] == 0.0 and r.metrics["fm"] == 0.0
    groups = load_finetune_checkpoint(str(tmp_path / "h"))["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head"]  # only the head is optimised
    assert all(p.requires_grad for p in r.classifier.head.parameters())


@pytest.mark.slow
def test_from_scratch_ignores_the_pretrained_weights(pretrained, tmp_path):
    r = finetune(checkpoint=pretrained, out=str(tmp_path / "s"), steps=2, from_scratch=True, **FAST)
    ckpt = load_finetune_checkpoint(str(tmp_path / "s"))
    assert ckpt["pretrain"] is None
    assert ckpt["model_config"] == load_checkpoint(pretrained)["model_config"]  # same architecture
    ema = build_model(load_checkpoint(pretrained), ema=True)
    same = [torch.equal(a, b) for a, b in zip(ema.state_dict().values(), r.classifier.flow.state_dict().values())]
    assert sum(same) < len(same) / 2
    # and without a checkpoint, from a preset
    r2 = finetune(out=str(tmp_path / "s2"), steps=1, from_scratch=True, model="tiny", **FAST)
    assert r2.metrics["fm_path"] == "otcfm" and 0.0 <= r2.metrics["top1"] <= 1.0


@pytest.mark.slow
def test_segment_and_save_at(pretrained, tmp_path):
    r = finetune(checkpoint=pretrained, out=str(tmp_path / "seg"), steps=2, t0=0.5, save_at=[0.75, 1.0], **FAST)
    ckpt = load_finetune_checkpoint(str(tmp_path / "seg"))
    assert ckpt["classifier"]["t0"] == 0.5 and ckpt["classifier"]["save_at"] == [0.75, 1.0]
    assert ckpt["head_config"]["in_shape"] == [2, 8, 8]
    assert evaluate(str(tmp_path / "seg"))["top1"] == r.metrics["top1"]


# -- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t0, t", [(0.5, 0.5), (0.75, 0.25), (1.0, 1.0)])
def test_t0_not_below_t(pretrained, tmp_path, t0, t):
    with pytest.raises(ValueError, match="t0 < t"):
        finetune(checkpoint=pretrained, out=str(tmp_path / "x"), steps=1, t0=t0, t=t, **FAST)
    assert not (tmp_path / "x").exists()


def test_t0_not_below_t_cli(pretrained, tmp_path, capsys):
    code = cli.main(["finetune", "--data", "digits", "--checkpoint", pretrained, "--out", str(tmp_path / "x"),
                     "--steps", "1", "--t0", "0.5", "--t", "0.5", "--no-progress"])
    assert code == 2
    assert "t0 < t" in capsys.readouterr().err


def test_finetune_from_a_finetuned_checkpoint_is_refused(finetuned, tmp_path):
    out, _ = finetuned
    with pytest.raises(CheckpointError, match="pretraining checkpoint"):
        finetune(checkpoint=out, out=str(tmp_path / "y"), steps=1, **FAST)


def test_evaluate_a_pretraining_checkpoint_is_refused(pretrained, capsys):
    with pytest.raises(CheckpointError, match="no classifier head"):
        evaluate(pretrained, "digits")
    assert cli.main(["evaluate", "--data", "digits", "--checkpoint", pretrained]) == 2
    assert "no classifier head" in capsys.readouterr().err


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        evaluate(str(tmp_path), "digits")
    torch.save({"format": "something.else"}, str(bad))
    with pytest.raises(CheckpointError, match="not a prg_fast finetuning checkpoint"):
        evaluate(str(tmp_path), "digits")
    with pytest.raises(FileNotFoundError):
        evaluate(str(tmp_path / "missing"), "digits")


def _folder_data(root, classes, size=8, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(d / f"{i}.png")
    return f"folder:{root}"


def test_evaluate_with_the_wrong_number_of_classes(finetuned, tmp_path):
    out, _ = finetuned
    spec = _folder_data(tmp_path / "three", classes=3)
    with pytest.raises(CheckpointError, match="classifies 10 classes.*has 3"):
        evaluate(out, spec)


def test_data_of_another_shape_is_refused(pretrained, tmp_path):
    spec = _folder_data(tmp_path / "big", classes=2, size=16)
    with pytest.raises(CheckpointError, match="1x8x8.*1x16x16"):
        finetune(checkpoint=pretrained, data=spec, out=str(tmp_path / "z"), steps=1, batch_size=2,
                 progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(ode_steps=0), "ode_steps"),
    (dict(method="dopri5"), "method"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(beta=-1.0), "beta"),
    (dict(save_at=[0.5, 1.5]), "save_at"),
    (dict(freeze_flow=True, from_scratch=True), "freeze_flow"),
    (dict(checkpoint=None), "checkpoint"),
    (dict(checkpoint=None, from_scratch=True), "--model"),
])
def test_bad_config(kwargs, match):
    base = dict(checkpoint="unused", out="unused")
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**{**base, **kwargs}).validate()


# -------------------------------------------------------------------------------------------------
# distributed: two CPU processes, gloo on localhost


def _ddp_worker(rank, world, port, pretrained, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    res = finetune(checkpoint=pretrained, out=out, steps=4, ckpt_every=3, beta=0.1, device="cpu", **FAST)
    torch.save({"state": _states(res), "metrics": res.metrics}, os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_finetune_identical_replicas_and_evaluate_in_shards(pretrained, tmp_path, free_port):
    out, results = str(tmp_path / "ddp"), str(tmp_path / "results")
    os.makedirs(results)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port, pretrained, out, results), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # every rank got the whole split's top-1 from the shards' all-reduced counts; it is the number
    # one process computes over the whole split with the written weights
    assert r0["metrics"]["top1"] == r1["metrics"]["top1"] == evaluate(out, "digits")["top1"]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.csv", "metrics.json"]
    ckpt = load_finetune_checkpoint(out)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    for k, v in r0["state"].items():
        part, name = k.split(".", 1)
        assert torch.equal(ckpt[part][name], v), k
    assert json.load(open(os.path.join(out, "metrics.json")))["world_size"] == 2


# -------------------------------------------------------------------------------------------------
# label-scarce finetuning (--labels-per-class)


@pytest.mark.slow
def test_labels_per_class_trains_on_a_seeded_balanced_subset(pretrained, tmp_path):
    r = finetune(checkpoint=pretrained, out=str(tmp_path / "n2"), steps=3, labels_per_class=2, labels_seed=7,
                 **{**FAST, "batch_size": 20})
    m = json.load(open(tmp_path / "n2" / "metrics.json"))
    assert m["labels_per_class"] == 2 and m["labels_seed"] == 7 and m["labels_seed_used"] == 7
    assert m["train_size"] == 20
    assert m["test_size"] == 360  # evaluation always on the whole test split
    assert m["top1"] == r.metrics["top1"]
    # the seed defaults to the run's seed, and is written out resolved
    finetune(checkpoint=pretrained, out=str(tmp_path / "n1"), steps=1, labels_per_class=1, seed=4,
             **{**FAST, "batch_size": 10})
    m1 = json.load(open(tmp_path / "n1" / "metrics.json"))
    assert m1["labels_seed"] is None and m1["labels_seed_used"] == 4 and m1["train_size"] == 10


def test_labels_per_class_uses_exactly_the_subset(pretrained, tmp_path, monkeypatch):
    # the images the finetuner sees are the class_balanced_subset of the training split, no others
    from prg_fast.data import ImageData, class_balanced_subset, load_data

    seen = []
    real_batch = ImageData.batch

    def spy(self, indices, **kw):
        x, y = real_batch(self, indices, **kw)
        if self.split == "train":
            seen.append(self.images[torch.as_tensor(indices)].clone())
        return x, y

    monkeypatch.setattr(ImageData, "batch", spy)
    finetune(checkpoint=pretrained, out=str(tmp_path / "s"), steps=4, labels_per_class=1, labels_seed=3,
             **{**FAST, "batch_size": 10})
    train = load_data("digits", "train", augment=None)
    expected = train.images[class_balanced_subset(train.labels, 1, 3)]
    got = torch.cat(seen)
    assert len(got) == 40
    exp_set = {bytes(im.flatten().tolist()) for im in expected}
    assert {bytes(im.flatten().tolist()) for im in got} == exp_set  # 4 full-batch epochs of the 10 images


@pytest.mark.slow
def test_labels_per_class_resume_is_exact(pretrained, tmp_path):
    common = dict(checkpoint=pretrained, lr=1e-3, beta=0.5, warmup=0, schedule="constant", ckpt_every=100,
                  labels_per_class=3, hflip=True, crop_padding=1, **{**FAST, "batch_size": 15})
    straight = finetune(out=str(tmp_path / "a"), steps=6, **common)
    finetune(out=str(tmp_path / "b"), steps=3, **common)
    resumed = finetune(out=str(tmp_path / "b"), steps=6, **common)
    a, b = _states(straight), _states(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(CheckpointError, match="labels_per_class"):
        finetune(out=str(tmp_path / "b"), steps=8, **{**common, "labels_per_class": 2})


def test_labels_per_class_errors(pretrained, tmp_path):
    with pytest.raises(ValueError, match="labels_per_class must be an integer >= 1"):
        FinetuneConfig(checkpoint="unused", labels_per_class=0).validate()
    with pytest.raises(ValueError, match="labels_seed must be an integer >= 0"):
        FinetuneConfig(checkpoint="unused", labels_per_class=1, labels_seed=-1).validate()
    with pytest.raises(ValueError, match=r"labels_per_class=500 is larger than the smallest class \(class 8 has 139 .*<= 139"):
        finetune(checkpoint=pretrained, out=str(tmp_path / "x"), steps=1, labels_per_class=500, **FAST)
    with pytest.raises(ValueError, match=r"batch_size \(64\) is larger than the labelled subset"):
        finetune(checkpoint=pretrained, out=str(tmp_path / "y"), steps=1, labels_per_class=2, **FAST)


def test_labels_per_class_cli(pretrained, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli.main(["finetune", "--data", "digits", "--checkpoint", pretrained, "--out", out, "--steps", "1",
                     "--batch-size", "10", "--ode-steps", "1", "--labels-per-class", "1", "--labels-seed", "2",
                     "--no-progress"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["labels_per_class"] == 1 and m["labels_seed_used"] == 2 and m["train_size"] == 10
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--data", "digits", "--checkpoint", pretrained, "--out", out, "--labels-per-class", "0"])
    assert "--labels-per-class" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# learning where to read (--learn-t, issue 11 item 3)


@pytest.mark.slow
def test_learn_t_moves_the_segment_end_and_records_it(pretrained, tmp_path):
    out = str(tmp_path / "lt")
    r = finetune(checkpoint=pretrained, out=out, steps=6, learn_t=True, learn_t0=True, t_lr=0.5, warmup=0,
                 schedule="constant", **FAST)
    clf = r.classifier
    assert clf.learn_t and clf.learn_t0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["t_final"] == pytest.approx(clf.t) and m["t0_final"] == pytest.approx(clf.t0)
    assert m["learn_t"] is True and m["t"] == 1.0  # the argument stays what was asked
    assert 0.0 <= clf.t0 < clf.t <= 1.0
    # both ends moved from their start (t = 0.999, t0 = 0.001: logits +-6.9); the logits are what Adam steps
    # (~t_lr per step), the times themselves move little near the saturated ends
    start = math.log(0.999 / 0.001)
    assert abs(clf.t_raw.item() - start) > 1.0 and abs(clf.t0_raw.item() + start) > 1.0
    # the checkpoint carries the learned values; evaluate reads features at them
    ckpt = load_finetune_checkpoint(out)
    assert ckpt["classifier"]["t"] == pytest.approx(clf.t) and set(ckpt["segment"]) == {"t_raw", "t0_raw"}
    ev = evaluate(out, "digits")
    assert ev["t"] == pytest.approx(clf.t) and ev["top1"] == pytest.approx(m["top1"])


def test_learn_t_fixed_runs_have_no_time_parameters(pretrained, tmp_path):
    r = finetune(checkpoint=pretrained, out=str(tmp_path / "fixed"), steps=2, **FAST)
    assert not hasattr(r.classifier, "t_raw")
    assert "segment" not in load_finetune_checkpoint(str(tmp_path / "fixed"))
    assert r.metrics["t_final"] == 1.0 and r.metrics["t0_final"] == 0.0


@pytest.mark.slow
def test_learn_t_resume_is_exact(pretrained, tmp_path):
    common = dict(checkpoint=pretrained, learn_t=True, t_lr=0.3, lr=1e-3, warmup=0, schedule="constant",
                  ckpt_every=100, **FAST)
    straight = finetune(out=str(tmp_path / "a"), steps=6, **common)
    finetune(out=str(tmp_path / "b"), steps=3, **common)
    resumed = finetune(out=str(tmp_path / "b"), steps=6, **common)
    assert resumed.metrics["resumed_from_step"] == 3
    assert torch.equal(straight.classifier.t_raw, resumed.classifier.t_raw)
    a, b = _states(straight), _states(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a run that learned t cannot be resumed as a fixed-t run, nor the other way round
    with pytest.raises(CheckpointError, match="learn_t"):
        finetune(out=str(tmp_path / "b"), steps=8, **{**common, "learn_t": False})


def test_learn_t_errors_and_cli(pretrained, tmp_path):
    with pytest.raises(ValueError, match="save_at"):
        finetune(checkpoint=pretrained, out=str(tmp_path / "e"), steps=1, learn_t=True, save_at=[0.5, 1.0], **FAST)
    with pytest.raises(ValueError, match="t_lr"):
        finetune(checkpoint=pretrained, out=str(tmp_path / "e2"), steps=1, learn_t=True, t_lr=0.0, **FAST)
    out = str(tmp_path / "cli")
    assert cli.main(["finetune", "--data", "digits", "--checkpoint", pretrained, "--out", out, "--steps", "2",
                     "--batch-size", "64", "--ode-steps", "2", "--learn-t", "--t-lr", "0.2", "--no-progress"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["learn_t"] is True and m["t_lr"] == 0.2 and 0.0 < m["t_final"] <= 1.0


def _evaluate_worker(rank, world, port, checkpoint, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    m = evaluate(checkpoint, "digits", device="cpu")
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(m, f)


@pytest.mark.slow
def test_evaluate_under_two_processes_counts_the_whole_split_once(finetuned, tmp_path, free_port):
    """evaluate() under torchrun: each rank classifies its shard, the counts are all-reduced, every
    rank reports the one-process number (no image counted twice or missed)."""
    out, _ = finetuned
    results = str(tmp_path / "results")
    os.makedirs(results)
    torch.multiprocessing.spawn(_evaluate_worker, args=(2, free_port, out, results), nprocs=2, join=True)
    r0, r1 = (json.load(open(os.path.join(results, f"rank{r}.json"))) for r in (0, 1))
    single = evaluate(out, "digits", device="cpu")
    assert r0["top1"] == r1["top1"] == single["top1"]
    assert r0["correct"] == single["correct"] and r0["test_size"] == single["test_size"] == 360

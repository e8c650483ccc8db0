"""Bad configs are reported before anything is built or trained: all problems at once, each
naming the key, the value and what is valid."""

from __future__ import annotations

import pytest

from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli

# (overrides, what the message must say)
BAD_CONFIGS = [
    (["optimizer.lr=-1"], "optimizer.lr=-1; expected a number > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0; expected a number > 0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1; expected a number >= 0"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum=1.5; expected a number in [0, 1)"),
    (["data.batch_size=0"], "data.batch_size=0; expected an integer >= 1"),
    (["data.batch_size=abc"], "data.batch_size='abc'; expected an integer >= 1"),
    (["data.batch_size=2.5"], "data.batch_size=2.5; expected an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1; expected an integer >= 0"),
    (
        ["data.task=regression"],
        "data.task='regression'; expected one of ['binary', 'multiclass', 'multilabel', 'segmentation'",
    ),
    (["data.spatial_dims=4"], "data.spatial_dims=4; expected one of [2, 3]"),
    (["data.image_size=0"], "data.image_size=0; expected an integer >= 1"),
    (["model.net.dropout=1.0"], "model.net.dropout=1.0; expected a number in [0, 1)"),
    (["model.net.dropout=-0.1"], "model.net.dropout=-0.1; expected a number in [0, 1)"),
    (["model.label_smoothing=1"], "model.label_smoothing=1; expected a number in [0, 1)"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0; expected an integer >= 1"),
    (["trainer.precision=15"], "trainer.precision=15; expected one of [64, 32, 16"),
    (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0; expected an integer >= 1"),
    (["+trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1; expected a number >= 0 or null"),
    (["seed=-5"], "seed=-5; expected an integer in [0, 4.29497e+09] or null"),
    (["train=maybe"], "train='maybe'; expected true or false"),
    (
        ["+trainer.max_epoch=3"],
        "trainer.max_epoch: not an argument of lightning.pytorch.Trainer; did you mean max_epochs",
    ),
    (
        ["+data.batchsize=3"],
        "data.batchsize: not an argument of medexp.data.synthetic.SyntheticDataModule; did you mean batch_size",
    ),
    (
        ["+model.net.dropuot=0.2"],
        "model.net.dropuot: not an argument of medexp.nets.simple_cnn.SimpleCNN; did you mean dropout",
    ),
    (["+optimizer.lrr=0.1"], "optimizer.lrr: not an argument of torch.optim.Adam; did you mean lr"),
    (
        ["+callbacks.model_checkpoint.monitr=val/loss"],
        "callbacks.model_checkpoint.monitr: not an argument of lightning.pytorch.callbacks.ModelCheckpoint; did you mean monitor",
    ),
    (
        ["model=unet"],
        "the model (SegmentationTask) trains on data.task in ['segmentation'], but data.task='binary'; models for binary data: model=autoencoder,autoencoder_classifier,cnn,",
    ),
    (
        ["data=medmnist", "model=densenet121"],
        "the net (DenseNet121) needs at least 29 pixels (voxels) per side, but data.image_size=28",
    ),
    (
        ["model=cnn_lstm"],
        "the net (CNNLSTM) reads sequences of images, but these data are single 2D images; use data=synthetic_longitudinal",
    ),
    (
        ["data=synthetic_seg", "model=cnn"],
        "models for segmentation data: model=attention_unet,basic_unet,segresnet,swin_unetr,unet,unetr",
    ),
    (["model.net.in_channels=3"], "model.net.in_channels=3 but data.in_channels=1; they must match"),
    (["model.net.spatial_dims=3"], "model.net.spatial_dims=3 but data.spatial_dims=2; they must match"),
    (["model.net.out_channels=5"], "the net has 5 outputs but data.num_classes=2; they must match"),
    (["model.monitor=val/dice"], "model.monitor='val/dice'; ClassificationTask logs"),
    (["data.image_size=null"], "data.image_size=null, but SyntheticDataModule draws its images at a size"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_a_bad_config_is_reported_before_training(overrides, message, tmp_path):
    cfg = compose_config([*QUIET, *overrides], output_dir=tmp_path)
    with pytest.raises(MedexpError) as error:
        train(cfg)
    assert message in str(error.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run_info.json").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = compose_config(
        [*QUIET, "optimizer.lr=-1", "data.batch_size=0", "+trainer.max_epoch=3", "model.net.in_channels=3"],
        output_dir=tmp_path,
    )
    with pytest.raises(MedexpError, match=r"^4 problem\(s\) in the config:\n") as error:
        train(cfg)
    assert str(error.value).count("\n  - ") == 4


def test_the_cli_shows_the_cause_in_a_few_lines_and_verbose_the_traceback(tmp_path):
    # its own process: every line the user sees counts, Lightning's and Python's included
    proc = run_cli("train", "optimizer.lr=-1", "data.batch_size=0", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "medexp: error: 2 problem(s) in the config:\n  - optimizer.lr=-1" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 4
    assert not (tmp_path / "logs" / "train" / "runs").exists() or not list((tmp_path / "logs").rglob("*.ckpt"))
    verbose = medexp_main("train", "optimizer.lr=-1", "--verbose", cwd=tmp_path, check=False)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "optimizer.lr=-1" in verbose.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batchsize=3", "Could not override 'data.batchsize'"),  # a typo without +: Hydra's own check
        ("model=resnet19", "Could not find 'model/resnet19'"),  # an unknown option: Hydra lists the valid ones
    ],
)
def test_hydra_reports_unknown_keys_and_options_before_medexp_starts(override, message, tmp_path):
    proc = run_cli("train", override, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr
    if override.startswith("model="):
        assert "resnet18" in proc.stderr  # the valid choices


def test_a_command_reports_every_bad_option_at_once(tmp_path):
    # medexp export's options through its RULES table, before the checkpoint is read
    from medexp.export import export

    overrides = ["ckpt_path=never-read.ckpt", f"output={tmp_path / 'out'}", "format=tflite", "opset=16.0"]
    cfg = compose_config([*overrides, "verify.batches=0", "verify.tolerance=inf"], "export", output_dir=tmp_path)
    with pytest.raises(MedexpError, match=r"^3 problem\(s\) in the config:\n") as error:
        export(cfg)
    assert "format='tflite'; expected one of ['onnx', 'pt2', 'bundle']" in str(error.value)
    assert "opset=16.0; expected an ONNX opset of at least 18" in str(error.value)
    assert "verify.batches=0; expected a positive integer, or null" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_rule_may_ask_for_an_int_itself_and_say_what_it_expects():
    from medexp.utils.validation import Rule

    rule = Rule("batch_size", "int", 1, exact=True, message="expected a positive integer")
    assert rule.check(2) is None
    assert rule.check(2.0) == "batch_size=2.0; expected a positive integer"
    assert Rule("batch_size", "int", 1).check(2.0) is None  # train's rules take 2.0 as 2
    assert Rule("tolerance", "number", 0, finite=False).check(float("inf")) is None
    assert Rule("tolerance", "number", 0, finite=False).check(float("nan")) == "tolerance=nan; expected a number >= 0"
    splits = Rule("splits", ("val", "test"), sequence=True, message="expected a non-empty subset of ['val', 'test']")
    assert splits.check(["test", "val"]) is None
    assert splits.check(["train"]) == "splits=['train']; expected a non-empty subset of ['val', 'test']"

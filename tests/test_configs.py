"""Every config group option composes and resolves; every model YAML builds and runs."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.utils import instantiate

from medexp.tasks.adversarial import AdversarialTask
from medexp.tasks.diffusion import DiffusionTask
from medexp.utils.config import check_config
from tests.conftest import REPO

CONF = REPO / "conf"
GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "debug", "experiment", "privacy"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
# which data each model is tried on, by the task its YAML builds on
DATA_FOR_TASK = {
    "classification": [["data.task=binary"], ["data.task=multilabel"]],
    "segmentation": [["data=synthetic_seg"], ["data=synthetic_seg", "data.spatial_dims=3", "data.num_classes=3"]],
    "reconstruction": [["data.task=binary"]],
    "adversarial": [["data.task=binary"], ["data.task=multiclass", "data.num_classes=3", "model.conditional=true"]],
    # the teacher is read only when training starts (tests/test_distillation.py trains with one)
    "distillation": [
        ["data.task=binary", "model.teacher_ckpt=teacher.ckpt"],
        ["data.task=multilabel", "model.teacher_ckpt=teacher.ckpt"],
    ],
    "registration": [["data=synthetic_reg"], ["data=synthetic_reg", "data.spatial_dims=3"]],
    "detection": [["data=synthetic_det"], ["data=synthetic_det", "data.spatial_dims=3"]],
    "translation": [["data=synthetic_translation"], ["data=synthetic_translation", "data.spatial_dims=3"]],
    # few DDIM steps: the test samples
    "diffusion": [
        ["data.task=binary", "model.sample_steps=2"],
        ["data.task=multiclass", "data.num_classes=3", "model.conditional=true", "model.sample_steps=2"],
    ],
}
SMALL = ["data.image_size=32", "data.num_samples={train: 4, val: 2, test: 2}"]
# models that need other data than their task's usual (sequences, volumes)
DATA_FOR_MODEL = {
    "cnn_lstm": [
        ["data=synthetic_longitudinal", "data.image_size=32", "data.num_patients={train: 4, val: 2, test: 2}"],
        ["data.spatial_dims=3", *SMALL],
    ],
    # GlobalNet is built for one input size on every axis (see conf/model/globalnet.yaml)
    "globalnet": [["data=synthetic_reg", *SMALL], ["data=synthetic_reg", "data.spatial_dims=3", *SMALL]],
    # SwinUNETR's bottleneck is 1/32 of the input: one pixel at 32, which instance norm (its default)
    # cannot normalise (see conf/model/swin_unetr.yaml); batch norm can
    "swin_unetr": [
        ["data=synthetic_seg", *SMALL, "data.image_size=64"],
        ["data=synthetic_seg", "data.spatial_dims=3", "data.num_classes=3", *SMALL, "model.net.norm_name=batch"],
    ],
}
# options that need a value no default can give
REQUIRED = {
    ("experiment", "breast_gan_augmented"): ["gan_ckpt=gan.ckpt"],
    ("model", "distill"): ["model.teacher_ckpt=teacher.ckpt"],
    ("data", "files_det"): ["data.manifest=boxes.csv"],
}


def _volumes(model: str) -> list[str]:
    # nets fixed to 3D (`spatial_dims: 3` in their YAML, e.g. resnet18_3d) are tried on volumes
    fixed_3d = re.search(r"^\s+spatial_dims: 3\b", (CONF / "model" / f"{model}.yaml").read_text(), re.M)
    return ["data.spatial_dims=3"] if fixed_3d else []


MODEL_CASES = [
    (model, data)
    for model in MODELS
    for task, variants in DATA_FOR_TASK.items()
    if f"task/{task}@_here_" in (CONF / "model" / f"{model}.yaml").read_text()
    for data in DATA_FOR_MODEL.get(model, [[*variant, *SMALL, *_volumes(model)] for variant in variants])
]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_and_resolves(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}", *REQUIRED.get((group, option), []))
    resolved = check_config(cfg)
    if group not in ("scheduler", "logger", "callbacks", "debug", "experiment", "privacy"):
        assert resolved[group], f"{group}={option} composed to an empty node"


AUGMENTATIONS = sorted(path.stem for path in (CONF / "data" / "augmentations").glob("*.yaml"))
SEGMENTATION = ["data=synthetic_seg", "model=unet", "model.roi_size=[16,16]"]


@pytest.mark.parametrize("augmentations", AUGMENTATIONS)
def test_augmentation_options_run_on_a_sample(compose_cfg, augmentations):
    # options for volumes (basic_3d) run on 3D image + mask pairs
    volumes = ["data.spatial_dims=3", "data.image_size=16"] if augmentations.endswith("_3d") else []
    cfg = compose_cfg(
        f"data/augmentations={augmentations}", *SEGMENTATION, *volumes, "data.num_samples={train: 4, val: 2, test: 2}"
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    assert (len(datamodule.augmentations) > 0) == (augmentations != "none")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == batch["label"].shape[1:] or augmentations == "patches"
    assert batch["image"].shape[0] == batch["label"].shape[0]


def test_eval_config_requires_checkpoint(compose_cfg):
    from medexp.utils.errors import MedexpError

    with pytest.raises(MedexpError, match="ckpt_path"):
        check_config(compose_cfg(config_name="eval"))


def test_every_model_file_is_tried():
    assert {model for model, _ in MODEL_CASES} == set(MODELS)


@pytest.mark.parametrize(("model", "data"), MODEL_CASES, ids=[f"{m}-{' '.join(d)}" for m, d in MODEL_CASES])
def test_model_builds_and_runs_on_matching_data(compose_cfg, model, data):
    """New files in conf/model/ are picked up here automatically."""
    cfg = compose_cfg(f"model={model}", *data, "data.batch_size=2")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    task_module = instantiate(cfg.model, _convert_="all").eval()
    if isinstance(task_module, DiffusionTask):  # generates images like the data's, learns their noise
        samples, labels = task_module.sample(3)
        assert samples.shape == (3, *batch["image"].shape[1:]) and (labels is not None) == task_module.conditional
        assert samples.min() >= cfg.data.intensity_range[0] and samples.max() <= cfg.data.intensity_range[1]
        with torch.no_grad():
            assert torch.isfinite(task_module._shared_step(batch, "val"))
        return
    if isinstance(task_module, AdversarialTask):  # a GAN: generates images like the data's, judges them
        samples, labels = task_module.sample(3)
        assert samples.shape == (3, *batch["image"].shape[1:]) and (labels is not None) == task_module.conditional
        assert samples.min() >= cfg.data.intensity_range[0] and samples.max() <= cfg.data.intensity_range[1]
        code = task_module.condition(batch["label"], batch["image"].device)
        assert task_module.discriminate(batch["image"], code).shape == (len(batch["image"]),)
        return
    with torch.no_grad():
        batch = task_module.prepare_batch(batch, "val")
        outputs = task_module.infer(batch["image"])
        loss = task_module.batch_loss(outputs, batch)
        outputs = task_module.postprocess(outputs)  # e.g. a VAE's reconstruction of its outputs
    # per image (classifiers) or per pixel (segmentation, reconstruction); channels: classes, or
    # the input's for a reconstruction
    spatial = batch["image"].shape[2:] if cfg.data.task == "segmentation" or outputs.ndim > 2 else ()
    assert outputs.shape == (len(batch["image"]), cfg.data[task_module.net_outputs], *spatial)
    assert torch.isfinite(outputs).all() and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("name", "task", "num_classes", "channels"),
    [("breastmnist", "binary", 2, 1), ("retinamnist", "multiclass", 5, 3), ("chestmnist", "multilabel", 14, 1)],
)
def test_data_properties_flow_into_the_model(compose_cfg, name, task, num_classes, channels):
    cfg = compose_cfg("data=medmnist", f"data.name={name}", "model=resnet18")
    assert (cfg.model.task, cfg.model.num_classes) == (task, num_classes)
    assert (cfg.model.net.n_input_channels, cfg.model.net.num_classes) == (channels, num_classes)


def test_multistep_follows_the_medmnist_protocol(compose_cfg):
    cfg = compose_cfg("scheduler=multistep", "trainer.max_epochs=100")
    assert list(cfg.scheduler.milestones) == [50, 75]


@pytest.mark.parametrize(("monitor", "mode"), [("val/auroc", "max"), ("val/loss", "min")])
def test_checkpoint_mode_follows_the_monitored_metric(compose_cfg, monitor, mode):
    cfg = compose_cfg(f"model.monitor={monitor}", "scheduler=plateau")
    assert cfg.callbacks.model_checkpoint.mode == mode
    assert cfg.scheduler.mode == mode


def test_experiment_overrides_several_groups(compose_cfg):
    cfg = compose_cfg("experiment=breastmnist_resnet18")
    assert cfg.data.name == "breastmnist"
    assert cfg.model.net._target_ == "monai.networks.nets.resnet18"
    assert cfg.scheduler._target_.endswith("MultiStepLR")
    assert cfg.trainer.max_epochs == 100

"""Every config group option composes and resolves; every model YAML builds and runs."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from medexp.utils.config import check_config
from tests.conftest import REPO

CONF = REPO / "conf"
GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "debug", "experiment"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_and_resolves(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    resolved = check_config(cfg)
    if group not in ("scheduler", "logger", "callbacks", "debug", "experiment"):
        assert resolved[group], f"{group}={option} composed to an empty node"


@pytest.mark.parametrize("augmentations", ["none", "basic"])
def test_augmentation_options_compose(compose_cfg, augmentations):
    cfg = compose_cfg(f"data/augmentations={augmentations}")
    transforms = instantiate(cfg.data.augmentations)
    assert (len(transforms) > 0) == (augmentations != "none")


def test_eval_config_requires_checkpoint(compose_cfg):
    from medexp.utils.errors import MedexpError

    with pytest.raises(MedexpError, match="ckpt_path"):
        check_config(compose_cfg(config_name="eval"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_model_builds_and_runs_on_matching_data(compose_cfg, model, task):
    """New files in conf/model/ are picked up here automatically."""
    cfg = compose_cfg(f"model={model}", f"data.task={task}", "data.num_samples={train: 8, val: 4, test: 4}")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    task_module = instantiate(cfg.model).eval()
    with torch.no_grad():
        logits = task_module(batch["image"])
    assert logits.shape == (len(batch["image"]), cfg.data.num_classes)
    assert torch.isfinite(logits).all()


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

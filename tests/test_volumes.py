"""3D volumes: MedMNIST 3D files, built-in 3D phantoms, 3D augmentations and 3D model configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from medexp.data.medmnist import MedMNISTDataModule
from medexp.data.medmnist_info import MEDMNIST
from medexp.utils.config import check_config
from medexp.utils.errors import MedexpError
from medexp.utils.validation import validate_config
from tests.conftest import QUIET

NAMES_3D = sorted(name for name, info in MEDMNIST.items() if info["dims"] == 3)
TINY = {"train": 6, "val": 3, "test": 4}


def write_medmnist3d_npz(path: Path, sizes: dict[str, int], num_classes: int, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST 3D-format ``.npz``: ``(N, D, H, W)`` uint8 volumes whose mean intensity depends
    on the label, labels ``(N, 1)`` (as the official files; see ``tests.helpers.write_medmnist_npz``)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        labels = rng.integers(0, num_classes, size=n)
        volumes = (
            rng.integers(0, 120, size=(n, size, size, size))
            + (labels * (100 // (num_classes - 1)))[:, None, None, None]
        )
        arrays[f"{split}_images"] = volumes.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def medmnist3d(root, name="organmnist3d", task="multiclass", num_classes=11, **kwargs) -> MedMNISTDataModule:
    return MedMNISTDataModule(
        name=name, root=root, task=task, num_classes=num_classes, in_channels=1, spatial_dims=3, **kwargs
    )


# ---------------------------------------------------------------------------------- MedMNIST 3D


def test_medmnist3d_loads_through_the_config(compose_cfg, tmp_path):
    write_medmnist3d_npz(tmp_path / "medmnist" / "organmnist3d.npz", TINY, num_classes=11)
    cfg = compose_cfg(
        "data=medmnist3d", "data.name=organmnist3d", f"data.root={tmp_path / 'medmnist'}", "data.batch_size=4"
    )
    assert (cfg.data.task, cfg.data.num_classes, cfg.data.in_channels, cfg.data.spatial_dims) == (
        "multiclass",
        11,
        1,
        3,
    )
    assert cfg.data.image_size == 28 and list(cfg.data.augmentations) == []
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert {split: len(ds) for split, ds in dm.datasets.items()} == TINY
    assert dm.class_names == MEDMNIST["organmnist3d"]["labels"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 28, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    # the MedMNIST protocol: [0, 255] -> [0, 1] -> [-1, 1]
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert dm.datasets["test"][0]["image"].shape == (1, 28, 28, 28)


@pytest.mark.parametrize("name", NAMES_3D)
def test_every_3d_dataset_derives_its_properties(compose_cfg, name):
    info = MEDMNIST[name]
    resolved = check_config(compose_cfg("data=medmnist3d", f"data.name={name}", "model=resnet18_3d"))
    assert resolved["data"]["num_classes"] == resolved["model"]["net"]["num_classes"] == len(info["labels"])
    assert resolved["data"]["task"] == info["task"] and resolved["model"]["net"]["spatial_dims"] == 3
    validate_config(resolved)  # a 3D net on 3D data: nothing to report


def test_volumes_of_the_wrong_size_are_named(tmp_path):
    write_medmnist3d_npz(tmp_path / "organmnist3d.npz", TINY, num_classes=11, size=16)
    with pytest.raises(MedexpError, match=r"organmnist3d.npz: train images are \(16, 16, 16\), expected data.size=28"):
        medmnist3d(tmp_path).setup()


def test_size_64_file_name_and_md5_verified_download(tmp_path, monkeypatch):
    import pooch

    calls = []

    def retrieve(url, known_hash, fname, path, progressbar):
        calls.append((url, known_hash, fname))
        write_medmnist3d_npz(Path(path) / fname, TINY, num_classes=2, size=16)

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    dm = medmnist3d(tmp_path, name="nodulemnist3d", task="binary", num_classes=2, size=64, download=True)
    assert dm.path == tmp_path / "nodulemnist3d_64.npz"
    dm.prepare_data()
    url, known_hash, fname = calls[0]
    assert url.endswith("/nodulemnist3d_64.npz?download=1") and fname == "nodulemnist3d_64.npz"
    assert known_hash == f"md5:{MEDMNIST['nodulemnist3d']['md5'][64]}"
    dm.prepare_data()  # present now: not fetched again
    assert len(calls) == 1


def test_a_2d_name_with_3d_volumes_is_refused(tmp_path):
    with pytest.raises(MedexpError) as info:
        medmnist3d(tmp_path, name="breastmnist", task="binary", num_classes=2)
    message = str(info.value)
    assert "data.name='breastmnist' is not a MedMNIST 3D dataset" in message
    assert str(NAMES_3D) in message  # the valid names for 3D
    assert "breastmnist is a 2D dataset (data=medmnist" in message


def test_a_3d_name_with_2d_images_is_refused(tmp_path):
    with pytest.raises(
        MedexpError,
        match=r"'organmnist3d' is not a MedMNIST 2D dataset; expected one of \['bloodmnist'.*"
        r"organmnist3d is a 3D dataset \(data=medmnist3d",
    ):
        MedMNISTDataModule(
            name="organmnist3d", root=tmp_path, task="multiclass", num_classes=11, in_channels=1, spatial_dims=2
        )


def test_a_2d_name_in_the_3d_config_is_refused(compose_cfg, tmp_path):
    from medexp.utils.config import build

    cfg = compose_cfg("data=medmnist3d", "data.name=breastmnist", f"data.root={tmp_path}")
    with pytest.raises(MedexpError, match="not a MedMNIST 3D dataset; expected one of .*'organmnist3d'"):
        build(cfg.data)


# ---------------------------------------------------------------------------------- 3D models


@pytest.mark.parametrize("model", ["resnet18_3d", "densenet121_3d"])
@pytest.mark.parametrize("data", ["synthetic", "medmnist"])
def test_3d_models_on_2d_data_stop_at_the_config_check(compose_cfg, model, data):
    with pytest.raises(MedexpError, match="model.net.spatial_dims=3 but data.spatial_dims=2"):
        validate_config(check_config(compose_cfg(f"data={data}", f"model={model}")))


def test_resnet18_3d_keeps_the_small_input_stem(compose_cfg):
    net = compose_cfg("data=synthetic_3d", "model=resnet18_3d").model.net
    assert (net.spatial_dims, net.conv1_t_size, net.conv1_t_stride, net.no_max_pool) == (3, 3, 1, True)


def test_densenet121_3d_classifies_a_small_volume(compose_cfg):
    cfg = compose_cfg(
        "data=synthetic_3d", "model=densenet121_3d", "data.task=multiclass", "data.num_classes=3", "data.image_size=32"
    )
    validate_config(check_config(cfg))
    task = instantiate(cfg.model, _convert_="all").eval()
    with torch.no_grad():
        logits = task.infer(torch.rand(2, 1, 32, 32, 32))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------- synthetic 3D, augmentations


def test_synthetic_3d_volumes(compose_cfg):
    cfg = compose_cfg("data=synthetic_3d", "data.num_samples={train: 8, val: 4, test: 4}")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    size = cfg.data.image_size
    assert batch["image"].shape == (8, 1, size, size, size) and batch["label"].shape == (8,)
    assert cfg.data.task == "binary" and set(batch["label"].tolist()) <= {0, 1}


def test_3d_augmentations_run_on_a_volume(compose_cfg):
    from monai.transforms import Compose, RandAffined, RandFlipd

    cfg = compose_cfg(
        "data=synthetic_3d", "data/augmentations=basic_3d", "data.num_samples={train: 4, val: 2, test: 2}"
    )
    augmentations = instantiate(cfg.data.augmentations, _convert_="all")
    assert sorted(t.flipper.spatial_axis for t in augmentations if isinstance(t, RandFlipd)) == [0, 1, 2]
    assert (
        len(next(t for t in augmentations if isinstance(t, RandAffined)).rand_affine.rand_affine_grid.rotate_range) == 3
    )
    for transform in augmentations:
        transform.prob = 1.0  # every one of them, at once
    chain = Compose(augmentations)
    chain.set_random_state(seed=0)
    volume = torch.rand(1, 8, 12, 16)  # (C, D, H, W), not a cube: each axis keeps its length
    out = chain({"image": volume.clone(), "label": torch.tensor(1)})
    assert out["image"].shape == volume.shape and torch.isfinite(torch.as_tensor(out["image"])).all()
    assert not torch.allclose(torch.as_tensor(out["image"]), volume)
    assert int(out["label"]) == 1
    # and as the datamodule runs them, on training volumes only
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and type(batch["image"]) is torch.Tensor


# ---------------------------------------------------------------------------------- end to end


def test_resnet18_3d_learns_the_3d_phantoms(compose_cfg, tmp_path):
    """`medexp train data=synthetic_3d model=resnet18_3d`, narrowed for a CPU: about 15-25 s."""
    from medexp.train import train

    cfg = compose_cfg(
        "data=synthetic_3d",
        "model=resnet18_3d",
        *QUIET,
        "model.net.widen_factor=0.25",  # the full-width net costs ~12x more per volume on CPU
        "optimizer.lr=1e-4",
        "data.num_samples={train: 256, val: 32, test: 64}",
        "trainer.max_epochs=3",
        "trainer.accelerator=cpu",
    )
    metrics = train(cfg)
    assert metrics["status"] == "complete"
    assert metrics["test"]["test/auroc"] > 0.7, metrics["test"]
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_cnn_lstm_reads_a_volume_as_a_sequence_of_slices(compose_cfg, tmp_path):
    """2.5D: the same model=cnn_lstm that reads series over time reads the slices of a volume."""
    from medexp.train import train

    cfg = compose_cfg(
        "data=synthetic_3d",
        "model=cnn_lstm",
        *QUIET,
        "model.net.encoder.channels=[8,16]",
        "model.net.feature_size=16",
        "model.net.hidden_size=16",
        "model.net.pooling=attention",
        "optimizer.lr=3e-3",
        "data.num_samples={train: 256, val: 32, test: 64}",
        "trainer.max_epochs=6",
    )
    assert cfg.model.net.sequence_axis == 2  # depth, derived from data.spatial_dims=3
    metrics = train(cfg)
    assert metrics["test"]["test/auroc"] > 0.8, metrics["test"]

"""Synthetic phantoms and MedMNIST files: content, splits, and clear errors on bad input."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from medexp.data.base import ArrayDataset
from medexp.data.medmnist import MedMNISTDataModule
from medexp.data.phantoms import make_phantoms
from medexp.data.synthetic import SyntheticDataModule
from medexp.utils.errors import MedexpError
from tests.helpers import write_medmnist_npz

SMALL = {"train": 40, "val": 10, "test": 12}


def medmnist(root, name="breastmnist", task="binary", num_classes=2, in_channels=1, **kwargs):
    return MedMNISTDataModule(
        name=name, root=root, task=task, num_classes=num_classes, in_channels=in_channels, spatial_dims=2, **kwargs
    )


def test_phantoms_are_deterministic_and_labelled():
    a = make_phantoms(64, 32, "binary", 2, np.random.default_rng(3))
    b = make_phantoms(64, 32, "binary", 2, np.random.default_rng(3))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    images, labels, masks = a
    assert images.shape == (64, 1, 32, 32) and images.dtype == np.uint8
    # the mask marks a lesion exactly when the label says there is one
    np.testing.assert_array_equal(masks.reshape(64, -1).any(axis=1), labels == 1)
    assert 0.3 < labels.mean() < 0.7


def test_phantom_lesions_are_brighter_than_their_surroundings():
    images, labels, masks = make_phantoms(200, 32, "binary", 2, np.random.default_rng(0))
    inside = images[masks == 1].astype(float).mean()
    body = images[(masks == 0) & (images > 60)].astype(float).mean()
    assert inside > body + 15


@pytest.mark.parametrize(("task", "num_classes", "label_shape"), [("multiclass", 3, (50,)), ("multilabel", 2, (50, 2))])
def test_phantom_tasks(task, num_classes, label_shape):
    _, labels, _ = make_phantoms(50, 32, task, num_classes, np.random.default_rng(0))
    assert labels.shape == label_shape
    assert set(np.unique(labels)) <= set(range(num_classes))


def test_synthetic_splits_differ_and_batches_are_dicts():
    dm = SyntheticDataModule(
        task="binary", num_classes=2, in_channels=1, spatial_dims=2, num_samples=SMALL, batch_size=8
    )
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == SMALL
    assert not torch.equal(dm.datasets["train"][0]["image"], dm.datasets["val"][0]["image"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32) and type(batch["image"]) is torch.Tensor
    assert batch["label"].dtype == torch.int64


@pytest.mark.parametrize("label_shape_n1", [True, False], ids=["labels(N,1)", "labels(N,)"])
def test_medmnist_grey_binary(tmp_path, label_shape_n1):
    write_medmnist_npz(tmp_path / "breastmnist.npz", SMALL, num_classes=2, label_shape_n1=label_shape_n1)
    dm = medmnist(tmp_path, batch_size=5)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (5, 1, 28, 28)
    assert batch["label"].shape == (5,)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_medmnist_rgb_multiclass_and_normalisation(tmp_path):
    from monai.transforms import NormalizeIntensityd

    write_medmnist_npz(tmp_path / "retinamnist.npz", SMALL, num_classes=5, channels=3)
    dm = medmnist(
        tmp_path,
        name="retinamnist",
        task="multiclass",
        num_classes=5,
        in_channels=3,
        transforms=[NormalizeIntensityd(keys=["image"], subtrahend=0.5, divisor=0.5)],
    )
    dm.setup()
    image = dm.datasets["train"][0]["image"]
    assert image.shape == (3, 28, 28)
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < 0
    assert dm.label_counts()[1] == SMALL["train"]


def test_medmnist_multilabel(tmp_path):
    write_medmnist_npz(tmp_path / "chestmnist.npz", SMALL, num_classes=14, multilabel=True)
    dm = medmnist(tmp_path, name="chestmnist", task="multilabel", num_classes=14)
    dm.setup()
    assert dm.datasets["val"][0]["label"].shape == (14,)
    counts, total = dm.label_counts()
    assert counts.shape == (14,) and total == SMALL["train"]


def test_medmnist_64px_file_name(tmp_path):
    write_medmnist_npz(tmp_path / "breastmnist_64.npz", SMALL, num_classes=2, size=64)
    dm = medmnist(tmp_path, size=64)
    dm.setup()
    assert dm.datasets["train"][0]["image"].shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "brestmnist"},
            r"data.name='brestmnist' is not a MedMNIST 2D dataset; expected one of \[.*'breastmnist'",
        ),
        ({"name": "organmnist3d"}, "not a MedMNIST 2D dataset"),
        ({"size": 32}, r"data.size=32; breastmnist is offered at sizes \[28, 64, 128, 224\]"),
        ({"num_classes": 3, "task": "multiclass"}, "data.num_classes=3 but breastmnist has 2"),
    ],
)
def test_medmnist_bad_options(tmp_path, kwargs, message):
    write_medmnist_npz(tmp_path / "breastmnist.npz", SMALL, num_classes=2)
    with pytest.raises(MedexpError, match=message):
        medmnist(tmp_path, **kwargs)


def test_medmnist_missing_file_names_it_and_the_download_option(tmp_path):
    with pytest.raises(MedexpError) as info:
        medmnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "breastmnist.npz") in str(info.value)
    assert "data.download=true" in str(info.value)


def test_medmnist_corrupt_file_is_named(tmp_path):
    path = write_medmnist_npz(tmp_path / "breastmnist.npz", SMALL, num_classes=2)
    path.write_bytes(path.read_bytes()[:200])  # a truncated download
    dm = medmnist(tmp_path)
    with pytest.raises(MedexpError, match=r"breastmnist.npz: cannot read it as a .npz archive.*corrupt"):
        dm.setup()


def test_medmnist_wrong_arrays_are_named(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(MedexpError, match=r"not a MedMNIST file; missing arrays \['train_images'"):
        medmnist(tmp_path).setup()


def test_medmnist_labels_out_of_range_are_reported(tmp_path):
    write_medmnist_npz(tmp_path / "breastmnist.npz", SMALL, num_classes=4)
    # the data check names each sample; without it (data.scan=off) the split's range is reported
    with pytest.raises(
        MedexpError,
        match=r"labels outside the classes \(\d+\): train sample \d+: label [23] is not a class index 0\.\.1",
    ):
        medmnist(tmp_path).setup()
    with pytest.raises(MedexpError, match=r"train split: labels must be class indices in \[0, 1\]"):
        medmnist(tmp_path, scan="off").setup()


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server (loopback only) standing in for Zenodo."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("checksum_matches", [True, False])
def test_download_is_md5_verified(tmp_path, monkeypatch, file_server, checksum_matches):
    import medexp.data.medmnist as module

    served, base = file_server
    source = write_medmnist_npz(served / "breastmnist.npz", SMALL, num_classes=2)
    md5 = hashlib.md5(source.read_bytes()).hexdigest() if checksum_matches else "0" * 32
    monkeypatch.setattr(module, "url", lambda name, size: f"{base}/breastmnist.npz")
    info = {**module.dataset_info("breastmnist"), "md5": {28: md5}}
    monkeypatch.setattr(module, "dataset_info", lambda name, dims=None: info)

    dm = medmnist(tmp_path / "root", download=True)
    if checksum_matches:
        dm.prepare_data()
        dm.setup()
        assert (tmp_path / "root" / "breastmnist.npz").is_file()
        assert len(dm.datasets["test"]) == SMALL["test"]
    else:
        with pytest.raises(MedexpError, match="download of .* failed: .*(MD5|md5|hash)"):
            dm.prepare_data()
        assert not (tmp_path / "root" / "breastmnist.npz").exists()


@pytest.mark.parametrize(
    ("name", "task", "num_classes", "channels"),
    [("breastmnist", "binary", 2, 1), ("retinamnist", "multiclass", 5, 3), ("pneumoniamnist", "binary", 2, 1)],
)
def test_real_medmnist_files(shared_medmnist, name, task, num_classes, channels):
    if not (shared_medmnist / f"{name}.npz").is_file():
        pytest.skip(f"{name}.npz is absent")
    dm = medmnist(shared_medmnist, name=name, task=task, num_classes=num_classes, in_channels=channels)
    dm.setup()
    sizes = {split: len(ds) for split, ds in dm.datasets.items()}
    official = dm.info["splits"]
    assert sizes["val"] == official["val"] and sizes["test"] == official["test"]
    counts, total = dm.label_counts()
    assert total == sizes["train"] and (counts > 0).all()
    assert dm.datasets["train"][0]["image"].shape == (channels, 28, 28)


def test_prebuilt_samples_and_batches_equal_those_made_per_sample(compose_cfg):
    # a deterministic MONAI chain (MedMNIST's normalisation) is run once at setup; epochs index it
    cfg = compose_cfg(
        "data.num_samples={train: 40, val: 10, test: 10}",
        "data.batch_size=16",
        "data.transforms=[{_target_: monai.transforms.NormalizeIntensityd, keys: [image], subtrahend: 0.5, divisor: 0.5}]",
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    batches = list(datamodule.test_dataloader())
    prebuilt = datamodule.datasets["test"]
    assert prebuilt.prebuilt is not None
    fresh = ArrayDataset(prebuilt.images, prebuilt.labels.numpy(), prebuilt.transform)
    fresh.masks = prebuilt.masks
    for index in (0, 7):
        made, kept = fresh[index], prebuilt[index]
        assert made.keys() == kept.keys() == {"image", "label", "mask"}
        for key in made:
            assert made[key].dtype == kept[key].dtype and torch.equal(made[key], kept[key])
    assert prebuilt[0]["image"].min() < 0  # normalised to [-1, 1]
    expected = list(torch.utils.data.DataLoader(fresh, batch_size=16))
    assert len(batches) == len(expected) == 1 + 10 // 16
    for batch, reference in zip(batches, expected):
        assert all(torch.equal(batch[key], reference[key]) for key in reference)
    # a torch DataLoader with its own collate function still sees samples
    assert torch.equal(
        next(iter(torch.utils.data.DataLoader(prebuilt, batch_size=4)))["image"], expected[0]["image"][:4]
    )


def test_random_augmentations_are_not_prebuilt(compose_cfg):
    cfg = compose_cfg("data/augmentations=basic", "data.num_samples={train: 8, val: 4, test: 4}")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    datamodule.train_dataloader(), datamodule.val_dataloader()
    assert datamodule.datasets["train"].prebuilt is None  # drawn anew every epoch
    assert datamodule.datasets["val"].prebuilt is not None

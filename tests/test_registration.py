"""Registration: folding and pair metrics, synthetic pairs with a known deformation, training
through `medexp train` (2D and 3D, synthetic and file pairs), `medexp predict` outputs in the
fixed image's geometry, and early errors for bad options and manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medexp.checkpoints.checkpoint import CONFIG_KEY, load_checkpoint
from medexp.data.phantoms import make_phantoms, random_ddf, warp_arrays
from medexp.data.registration import FileRegistrationDataModule, SyntheticRegistrationDataModule, read_pairs
from medexp.inference.writers import resize_ddf
from medexp.metrics.registration import folding_fraction, jacobian_determinant, pair_dice
from medexp.predict import predict
from medexp.train import train
from medexp.utils.config import build, check_config
from medexp.utils.errors import MedexpError
from medexp.utils.validation import validate_config
from tests.conftest import QUIET, compose_config, medexp_main
from tests.test_files import write_csv, write_png

nib = pytest.importorskip("nibabel")

SMALL_LOCALNET = ["model=localnet", "model.net.num_channel_initial=8"]
# a non-trivial affine (anisotropic spacing, an offset): what the outputs of predict must keep
AFFINE = np.array([[0.8, 0.0, 0.0, 5.0], [0.0, 1.2, 0.0, -3.0], [0.0, 0.0, 2.0, 7.5], [0.0, 0.0, 0.0, 1.0]])


def test_jacobian_determinant_and_folding_of_known_fields():
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"))[None]  # (1, 2, 8, 8)
    shift = torch.full((1, 2, 8, 8), 2.5)
    torch.testing.assert_close(jacobian_determinant(shift), torch.ones(1, 8, 8))  # a translation
    # x -> x + 0.5 x = 1.5 x per axis: det 2.25; x -> x - 2 x = -x per axis: det 1, but mirrored
    # along one axis only (u = (-2 y, 0)): det -1 everywhere, all folded
    torch.testing.assert_close(jacobian_determinant(0.5 * grid), torch.full((1, 8, 8), 2.25))
    mirror = torch.cat([-2 * grid[:, :1], torch.zeros(1, 1, 8, 8)], dim=1)
    torch.testing.assert_close(jacobian_determinant(mirror), torch.full((1, 8, 8), -1.0))
    assert folding_fraction(torch.cat([shift, mirror])).tolist() == [0.0, 1.0]
    volume = torch.zeros(1, 3, 4, 5, 6)
    volume[:, 2] = -2 * torch.arange(6.0)  # mirrored along the last axis of a volume
    assert float(folding_fraction(volume)) == 1.0
    empty, lesion = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert torch.isnan(pair_dice(empty, empty)).all() and float(pair_dice(lesion, empty)) == 0.0


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, 32), (3, 16)])
def test_synthetic_pairs_hold_the_deformation_that_registers_them(compose_cfg, spatial_dims, size):
    """The known deformation is what a perfect model outputs: warping each moving image by it
    gives its fixed image, so the metrics of this oracle are perfect and those of no
    registration (the identity) are not."""
    data = SyntheticRegistrationDataModule(
        image_size=size, spatial_dims=spatial_dims, num_samples={"train": 4, "val": 4, "test": 12}
    )
    data.setup()
    test = data.datasets["test"]
    batch = next(iter(data.test_dataloader()))
    true_ddf = torch.from_numpy(test.true_ddf)
    assert batch["fixed"].shape == (12, 1, *[size] * spatial_dims) and true_ddf.shape == (
        12,
        spatial_dims,
        *[size] * spatial_dims,
    )
    assert 0.5 < true_ddf.abs().amax() <= 0.08 * size + 1e-4  # a real motion, within max_displacement

    task = instantiate(compose_cfg("data=synthetic_reg", *SMALL_LOCALNET).model, _convert_="all")
    metrics = {}
    for name, ddf in (("oracle", true_ddf), ("identity", torch.zeros_like(true_ddf))):
        collection = task.configure_metrics()
        task.update_metrics(collection, ddf, batch)
        metrics[name] = {key: float(value) for key, value in collection.compute().items()}
    oracle, identity = metrics["oracle"], metrics["identity"]
    assert oracle["ncc"] > 0.999 and oracle["mse"] < 1e-6 and oracle["folding"] == 0.0
    assert oracle["dice"] == pytest.approx(1.0)
    assert identity["ncc"] == pytest.approx(identity["ncc_before"]) and identity["ncc"] < 0.97
    assert identity["dice"] < 0.9 and identity["dice"] == pytest.approx(oracle["dice_before"])


def ddf_errors(ckpt: Path) -> tuple[float, float]:
    """Mean endpoint error (pixels) against the known deformations of the checkpoint's synthetic
    test pairs, inside the body (outside, the flat background does not tell where it moved): of
    the model's DDFs, and of the identity (no registration)."""
    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    model = instantiate(cfg.model, _convert_="all")
    model.load_state_dict(checkpoint["state_dict"])
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    test = data.datasets["test"]
    with torch.no_grad():
        batch = model.prepare_batch(next(iter(torch.utils.data.DataLoader(test, batch_size=len(test)))), "test")
        ddf = model.eval()(batch["image"])
    truth = torch.from_numpy(test.true_ddf)
    body = batch["fixed"][:, 0] > 0.2  # (N, H, W); the background is about 0.05
    return float((ddf - truth).norm(dim=1)[body].mean()), float(truth.norm(dim=1)[body].mean())


def test_2d_registration_through_medexp_train_and_predict(tmp_path):
    medexp_main(
        "train",
        "data=synthetic_reg",
        *SMALL_LOCALNET,
        "data.num_samples={train: 96, val: 16, test: 32}",
        "data.batch_size=4",
        "optimizer.lr=3e-3",
        "trainer.max_epochs=4",
        "hydra.run.dir=run",
        *QUIET,
        cwd=tmp_path,
    )
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    # better than no registration (the identity) on every count, without folding
    assert test["test/ncc"] > test["test/ncc_before"] + 0.02
    assert test["test/mse"] < 0.8 * test["test/mse_before"]
    assert test["test/dice"] > test["test/dice_before"]
    assert test["test/folding"] < 0.01
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    model_error, identity_error = ddf_errors(ckpt)
    assert model_error < 0.85 * identity_error  # the known deformation, partly recovered

    # predict: NIfTI pairs give NIfTI outputs in the fixed image's geometry; a PNG pair, a PNG
    images, _, _ = make_phantoms(4, 32, "segmentation", 2, np.random.default_rng(3))
    for name, image in zip(["fixed", "moving"], images[:2, 0]):
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), tmp_path / f"{name}.nii.gz")
    for name, image in zip(["fixed", "moving"], images[2:, 0]):
        write_png(tmp_path / "png" / f"{name}_photo.png", image)
    rows = [
        {"fixed": "fixed.nii.gz", "moving": "moving.nii.gz"},
        {"fixed": "png/fixed_photo.png", "moving": "png/moving_photo.png"},
    ]
    pairs = write_csv(tmp_path / "pairs.csv", rows)
    predict(
        compose_config(
            [f"ckpt_path={ckpt}", f"input={pairs}", f"output={tmp_path / 'out'}"],
            "predict",
            output_dir=tmp_path / "predict",
        )
    )
    out = tmp_path / "out"
    warped, ddf = nib.load(out / "moving_to_fixed_warped.nii.gz"), nib.load(out / "moving_to_fixed_ddf.nii.gz")
    assert warped.shape == (32, 32) and ddf.shape == (32, 32, 1, 2)
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(ddf.affine, AFFINE, atol=1e-5)
    # the warped image is the moving one resampled at x + ddf(x) (bilinear, edges extended)
    moving, field = images[1, 0].astype(np.float32), np.asarray(ddf.dataobj)[:, :, 0].transpose(2, 0, 1)
    expected = warp_arrays(moving[None, None], field[None].astype(np.float32))[0, 0]
    np.testing.assert_allclose(np.asarray(warped.dataobj), expected, atol=1e-3)
    # PNG: an 8-bit warped image and a (2, H, W) field of row and column displacements
    from PIL import Image

    png = np.asarray(Image.open(out / "moving_photo_to_fixed_photo_warped.png"))
    field = np.load(out / "moving_photo_to_fixed_photo_ddf.npy")
    assert png.dtype == np.uint8 and png.shape == (32, 32) and field.shape == (2, 32, 32)
    expected = warp_arrays(images[3, 0].astype(np.float32)[None, None], field[None])[0, 0]
    assert np.abs(png.astype(np.float32) - expected).max() <= 0.51  # rounded to 8 bits
    table = (out / "predictions.csv").read_text().splitlines()
    assert table[0] == "fixed,moving,warped,ddf" and len(table) == 3


def test_3d_diffeomorphic_registration_trains(compose_cfg):
    """VoxelMorph on volumes: a velocity field integrated by scaling and squaring (output=dvf)."""
    metrics = train(
        compose_cfg(
            *QUIET,
            "data=synthetic_reg",
            "data.spatial_dims=3",
            "data.image_size=16",
            "model=voxelmorph",
            "data.num_samples={train: 32, val: 8, test: 8}",
            "data.batch_size=8",
            "optimizer.lr=3e-3",
            "trainer.max_epochs=2",
        )
    )
    test = metrics["test"]
    assert test["test/ncc"] > test["test/ncc_before"] and test["test/folding"] < 0.01
    assert metrics["monitor"] == "val/ncc"


def nifti_pairs(folder: Path, count: int, shape: tuple[int, int]) -> Path:
    """``count`` NIfTI pairs (phantoms and their warped copies) with lesion masks, and their manifest."""
    rng = np.random.default_rng(0)
    images, masks, _ = make_phantoms(4 * count, max(shape), "segmentation", 2, rng)
    images, masks = images[:, :, : shape[0], : shape[1]], masks[:, :, : shape[0], : shape[1]]
    with_lesion = masks.reshape(len(masks), -1).any(axis=1)  # every pair has a mask to align
    images, masks = images[with_lesion][:count], masks[with_lesion][:count]
    ddf = random_ddf(count, max(shape), 2, 2.0, 4, rng)[:, :, : shape[0], : shape[1]]
    fixed = warp_arrays(images.astype(np.float32), np.ascontiguousarray(ddf))
    fixed_masks = warp_arrays(masks, np.ascontiguousarray(ddf), mode="nearest")
    rows = []
    for k in range(count):
        for name, array in (
            ("fixed", fixed[k, 0]),
            ("moving", images[k, 0]),
            ("fixed_label", fixed_masks[k, 0]),
            ("moving_label", masks[k, 0]),
        ):
            nib.save(nib.Nifti1Image(array.astype(np.float32), AFFINE), folder / f"{name}{k}.nii.gz")
        rows.append(
            {key: f"{key}{k}.nii.gz" for key in ("fixed", "moving", "fixed_label", "moving_label")}
            | {"patient_id": f"P{k // 2}"}
        )
    return write_csv(folder / "pairs.csv", rows)


def test_file_pairs_with_masks_train_globalnet_and_predict_on_their_grid(tmp_path):
    """Files resampled to data.image_size for GlobalNet (affine); predictions go back to each fixed
    image's own grid and affine."""
    manifest = nifti_pairs(tmp_path, 12, (20, 24))
    metrics = train(
        compose_config(
            [
                *QUIET,
                "data=files_reg",
                f"data.manifest={manifest}",
                "data.image_size=16",
                "model=globalnet",
                "optimizer.lr=1e-5",
                "model.label_weight=1.0",
                "trainer.max_epochs=1",
            ],
            output_dir=tmp_path / "run",
        )
    )
    test = metrics["test"]
    assert 0 < test["test/dice_before"] < 1 and 0 < test["test/dice"] <= 1  # the masks were read and counted
    assert test["test/folding"] == 0.0  # an affine map (near the identity) folds nowhere
    splits = (tmp_path / "run" / "splits.csv").read_text().splitlines()
    assert splits[0] == "fixed,moving,fixed_label,moving_label,split,patient_id" and len(splits) == 13

    predict(
        compose_config(
            [
                f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}",
                f"input={manifest}",
                f"output={tmp_path / 'out'}",
            ],
            "predict",
            output_dir=tmp_path / "predict",
        )
    )
    ddf = nib.load(tmp_path / "out" / "moving0_to_fixed0_ddf.nii.gz")
    warped = nib.load(tmp_path / "out" / "moving0_to_fixed0_warped.nii.gz")
    assert warped.shape == (20, 24) and ddf.shape == (20, 24, 1, 2)
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-5)
    # the moving image as stored, warped on the fixed image's own grid by the field written
    moving = np.asarray(nib.load(tmp_path / "moving0.nii.gz").dataobj)[None, None]
    field = np.asarray(ddf.dataobj)[:, :, 0].transpose(2, 0, 1)[None].astype(np.float32)
    np.testing.assert_allclose(np.asarray(warped.dataobj), warp_arrays(moving, field)[0, 0], atol=1e-3)
    # a field on the model's 16 x 16 grid goes back to 20 x 24 voxels: a 2-voxel shift is 2.5 and 3
    resized = resize_ddf(torch.full((2, 16, 16), 2.0), (20, 24))
    torch.testing.assert_close(resized, torch.stack([torch.full((20, 24), 2.5), torch.full((20, 24), 3.0)]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.similarity=ncc"], "model.similarity='ncc'; expected one of ['lncc', 'mse', 'mi']"),
        (["model.output=svf"], "model.output='svf'; expected one of ['ddf', 'dvf']"),
        (["model.reg_weight=-1"], "model.reg_weight=-1; expected a number >= 0"),
        (
            ["model.net.in_channels=1"],
            "model.net.in_channels=1 but data.in_channels=1; the net takes 2 x data.in_channels",
        ),
        (
            ["data.spatial_dims=3", "model.net.image_size=[32,32]"],
            "model.net.image_size=[32, 32]; the net needs the images' size, one number per axis",
        ),
        (["model.net.image_size=[16,16]"], "model.net.image_size=[16, 16]; the net needs the images' size"),
        (["model=cnn"], "models for registration data: model=globalnet,localnet,voxelmorph"),
    ],
)
def test_bad_options_are_refused_before_anything_is_built(compose_cfg, overrides, message):
    cfg = compose_cfg("data=synthetic_reg", "model=globalnet", *overrides)
    with pytest.raises(MedexpError) as error:
        validate_config(check_config(cfg))
    assert message in str(error.value)


def test_task_and_data_refuse_what_they_cannot_use(compose_cfg):
    with pytest.raises(MedexpError, match=r"model.kernel_size=4; expected an odd integer >= 3"):
        build(compose_cfg("data=synthetic_reg", *SMALL_LOCALNET, "model.kernel_size=4").model)
    task = build(compose_cfg("data=synthetic_reg", *SMALL_LOCALNET, "model.label_weight=1.0").model)
    pair = {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32)}
    with pytest.raises(MedexpError, match=r"model.label_weight=1.0 needs masks"):
        task.batch_loss(torch.zeros(1, 2, 32, 32), pair)
    with pytest.raises(MedexpError, match=r"data.task='segmentation'; registration data serve data.task=registration"):
        SyntheticRegistrationDataModule(task="segmentation")


def test_manifest_problems_name_the_file_and_lines(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, np.full((16, 16), 9, np.uint8))
    cases = [
        ([{"fixed": "a.png", "image": "b.png"}], r"missing column\(s\) \['moving'\]"),
        (
            [{"fixed": "a.png", "moving": "b.png", "fixed_label": "a.png"}],
            r"column 'fixed_label' without 'moving_label'",
        ),
        ([{"fixed": "a.png", "moving": "gone.png"}], r"1 listed file\(s\) do not exist .*line 2: moving 'gone.png'"),
        ([{"fixed": "a.png", "moving": "b.png", "split": "training"}], r"unknown split value\(s\) line 2: 'training'"),
        (
            [{"fixed": "a.png", "moving": "b.png", "fixed_label": "a.png", "moving_label": ""}],
            r"1 mask cell\(s\) are empty: line 2: no moving_label",
        ),
    ]
    for rows, message in cases:
        path = write_csv(tmp_path / "pairs.csv", rows)
        with pytest.raises(MedexpError, match=message) as error:
            read_pairs(path)
        assert str(path) in str(error.value)
    # a constant image cannot be registered (its correlation is undefined): named when read
    rows = [{"fixed": "a.png", "moving": "b.png", "split": split} for split in ("train", "val", "test")]
    with pytest.raises(MedexpError, match=r"a.png \(.*line 2\): the fixed image is unusable: every pixel is 9"):
        FileRegistrationDataModule(manifest=write_csv(tmp_path / "pairs.csv", rows)).setup()

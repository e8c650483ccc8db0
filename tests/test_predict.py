"""`medexp predict`: checkpoints applied to new image files, through the real CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from medexp.checkpoints.checkpoint import CONFIG_KEY, load_checkpoint
from medexp.data.phantoms import make_phantoms
from medexp.inference.inputs import find_inputs
from medexp.predict import predict
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main
from tests.test_files import png_manifest, write_csv

TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]
ONE_EPOCH = [*QUIET, "trainer.max_epochs=1", "test=false"]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def model_of(ckpt: Path) -> torch.nn.Module:
    """The checkpoint's model, rebuilt in-process as `medexp eval` does."""
    checkpoint = load_checkpoint(ckpt)
    model = instantiate(OmegaConf.create(checkpoint[CONFIG_KEY]).model, _convert_="all")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def fit(tmp: Path, *overrides: str) -> Path:
    train(compose_config([*ONE_EPOCH, *overrides], output_dir=tmp))
    return tmp / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("cls"), "data.num_samples={train: 64, val: 32, test: 32}", "data.batch_size=32")


def test_classification_csv_matches_the_model(classifier, tmp_path):
    images, _, _ = make_phantoms(5, 32, "binary", 2, np.random.default_rng(7))
    for index, image in enumerate(images):
        Image.fromarray(image[0]).save(tmp_path / f"case{index}.png")
    medexp_main(
        "predict",
        f"ckpt_path={classifier}",
        "input=*.png",
        "output=preds",
        "batch_size=2",
        "hydra.run.dir=run",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )

    rows = read_rows(tmp_path / "preds" / "predictions.csv")
    assert list(rows[0]) == ["image", "p_0", "p_1", "prediction"]
    assert [row["image"] for row in rows] == [f"case{k}.png" for k in range(5)]
    probs = torch.tensor([[float(row["p_0"]), float(row["p_1"])] for row in rows])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    # the same arrays as the data module serves them: uint8 scaled to [0, 1]
    with torch.no_grad():
        expected = model_of(classifier).postprocess(model_of(classifier)(torch.from_numpy(images).float() / 255))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert [int(row["prediction"]) for row in rows] == expected.argmax(dim=1).tolist()


def test_nifti_masks_keep_the_input_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.array([[0.0, 0.0, 2.5, -40.0], [1.5, 0.0, 0.0, 12.0], [0.0, -2.0, 0.0, 7.5], [0.0, 0.0, 0.0, 1.0]])
    rng = np.random.default_rng(0)
    rows = []
    for k, split in enumerate(["train", "train", "val", "test"]):
        mask = np.zeros((12, 14, 10), np.uint8)
        mask[3:8, 4:10, 2:7] = 1
        volume = (rng.normal(size=mask.shape) + 3 * mask).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, affine), tmp_path / f"ct{k}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / f"seg{k}.nii.gz")
        rows.append({"image": f"ct{k}.nii.gz", "label": f"seg{k}.nii.gz", "split": split})
    manifest = write_csv(tmp_path / "cases.csv", rows)
    new = tmp_path / "new"
    new.mkdir()
    shapes = {"a.nii.gz": (12, 14, 10), "b.nii.gz": (9, 11, 13)}
    for name, shape in shapes.items():
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), affine), new / name)
    # a resize in data.transforms: predictions are resized back onto each input's grid
    resize = "{_target_: monai.transforms.Resized, keys: [image, label], spatial_size: [16, 16, 16], mode: [trilinear, nearest]}"
    # the resized volumes cached on disk (data.cache=disk): predict reads and resizes on its own
    ckpt = fit(
        tmp_path / "run",
        "data=files",
        f"data.manifest={manifest}",
        "data.task=segmentation",
        "data.spatial_dims=3",
        "data.batch_size=2",
        f"data.transforms=[{resize}]",
        "data.cache=disk",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY_UNET,
    )
    # each training and validation case cached once (test=false: the test case is never read)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == sum(row["split"] != "test" for row in rows)

    medexp_main(
        "predict",
        f"ckpt_path={ckpt}",
        f"input={new}",
        "output=masks",
        "hydra.run.dir=p",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    for name, shape in shapes.items():
        written = nib.load(tmp_path / "masks" / name)
        assert written.shape == shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        assert written.get_data_dtype() == np.uint8 and set(np.unique(written.get_fdata())) <= {0, 1}
    rows = read_rows(tmp_path / "masks" / "predictions.csv")
    assert [Path(row["mask"]).name for row in rows] == ["a.nii.gz", "b.nii.gz"]


def test_png_masks_match_the_model(tmp_path):
    manifest = png_manifest(tmp_path / "data", patients=6, per_patient=1)
    ckpt = fit(
        tmp_path / "run",
        "data=files",
        f"data.manifest={manifest}",
        "data.task=segmentation",
        "data.mask_threshold=127",
        "data.batch_size=2",
        *TINY_UNET,
    )
    # not square, so a swapped axis would show
    image = np.random.default_rng(1).integers(0, 255, size=(16, 24), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "wide.png")

    medexp_main(
        "predict",
        f"ckpt_path={ckpt}",
        "input=wide.png",
        "output=masks",
        "hydra.run.dir=p",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    written = np.asarray(Image.open(tmp_path / "masks" / "wide.png"))
    assert written.shape == (16, 24) and written.dtype == np.uint8
    # file data are read as MONAI reads PNGs, (W, H), and min-max scaled as data.transforms does;
    # the mask comes back in the file's (H, W)
    x = torch.from_numpy(image.T).float()
    x = ((x - x.min()) / (x.max() - x.min()))[None, None]
    with torch.no_grad():
        expected = model_of(ckpt).infer(x).argmax(dim=1)[0].T.numpy()
    np.testing.assert_array_equal(written, expected)


def test_inputs_from_a_folder_and_a_csv(tmp_path):
    for name in ("b.png", "a.nii.gz", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert find_inputs(str(tmp_path)) == [tmp_path / "a.nii.gz", tmp_path / "b.png"]
    listing = write_csv(tmp_path / "list" / "cases.csv", [{"image": "../b.png"}, {"image": str(tmp_path / "a.nii.gz")}])
    assert [p.resolve() for p in find_inputs(str(listing))] == [tmp_path / "b.png", tmp_path / "a.nii.gz"]
    write_csv(listing, [{"image": "../b.png"}, {"image": "gone.png"}])
    with pytest.raises(MedexpError, match=r"1 listed image\(s\) do not exist .*line 3: 'gone.png'"):
        find_inputs(str(listing))
    with pytest.raises(MedexpError, match=r"no 'image' column \(found \['path'\]\)"):
        find_inputs(str(write_csv(listing, [{"path": "b.png"}])))
    with pytest.raises(MedexpError, match=r"input='nowhere': no such file or folder"):
        find_inputs("nowhere")


@pytest.mark.parametrize(
    ("ckpt", "pattern", "message"),
    [
        ("missing.ckpt", "*.png", r"ckpt_path='missing.ckpt': no such file"),
        (None, "*.png", r"input='.*/\*\.png': no file matches the pattern"),
    ],
    ids=["missing-checkpoint", "no-match"],
)
def test_bad_input(classifier, tmp_path, ckpt, pattern, message):
    overrides = [f"ckpt_path={ckpt or classifier}", f"input={tmp_path}/{pattern}", f"output={tmp_path}/out"]
    with pytest.raises(MedexpError, match=message):
        predict(compose_config(overrides, "predict", output_dir=tmp_path))
    assert not (tmp_path / "out").exists()


def test_predict_takes_data_overrides_that_fit_the_checkpoint(tmp_path):
    from medexp.predict import predict
    from medexp.train import train
    from medexp.utils.errors import MedexpError
    from tests.conftest import QUIET, compose_config

    train(
        compose_config(
            [*QUIET, "trainer.max_epochs=1", "data.num_samples={train: 32, val: 16, test: 16}"],
            output_dir=tmp_path / "run",
        )
    )
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    image = tmp_path / "x.png"
    image.write_bytes(b"")  # never read: the override is refused first
    cfg = compose_config(
        [f"ckpt_path={ckpt}", f"input={image}", f"output={tmp_path / 'out'}", "data.root=moved"],
        "predict",
        output_dir=tmp_path / "p",
    )
    with pytest.raises(MedexpError, match="data.root='moved' does not apply"):
        predict(cfg)


# --- uncertainty ----------------------------------------------------------------------------------


def phantom_pngs(folder: Path, n: int = 4) -> np.ndarray:
    images, _, _ = make_phantoms(n, 32, "binary", 2, np.random.default_rng(11))
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image[0]).save(folder / f"case{index}.png")
    return images


def predict_rows(ckpt: Path, tmp: Path, name: str, *overrides: str) -> list[dict]:
    cfg = compose_config(
        [
            f"ckpt_path={ckpt}",
            f"input={tmp / 'images'}",
            f"output={tmp / name}",
            "batch_size=2",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        "predict",
        output_dir=tmp / "run",
    )
    return read_rows(predict(cfg))


def test_mc_dropout_spreads_and_repeats_under_a_seed(classifier, tmp_path):
    phantom_pngs(tmp_path / "images")
    rows = predict_rows(classifier, tmp_path, "a", "uncertainty=mc_dropout", "samples=8", "seed=3")
    assert list(rows[0]) == ["image", "p_0", "p_1", "prediction", "entropy", "std"]
    assert max(float(row["std"]) for row in rows) > 0
    probs = torch.tensor([[float(row["p_0"]), float(row["p_1"])] for row in rows])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    entropy = -(probs * probs.log()).sum(dim=1)
    torch.testing.assert_close(torch.tensor([float(row["entropy"]) for row in rows]), entropy, atol=1e-5, rtol=0)
    assert [int(row["prediction"]) for row in rows] == probs.argmax(dim=1).tolist()

    assert predict_rows(classifier, tmp_path, "b", "uncertainty=mc_dropout", "samples=8", "seed=3") == rows
    other = predict_rows(classifier, tmp_path, "c", "uncertainty=mc_dropout", "samples=8", "seed=4")
    assert [row["std"] for row in other] != [row["std"] for row in rows]
    assert list(predict_rows(classifier, tmp_path, "d")[0]) == ["image", "p_0", "p_1", "prediction"]


def test_mc_dropout_keeps_batchnorm_in_evaluation_mode(classifier):
    from medexp.inference.loop import Sampled

    model = model_of(classifier)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [norm.running_mean.clone() for norm in norms]
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        passes = Sampled(model, "mc_dropout", 6).predict_step({"image": x}, 0)
    assert passes.shape == (6, 3, 2) and passes.std(dim=0).max() > 0
    assert all(torch.equal(norm.running_mean, old) for norm, old in zip(norms, before))
    assert not any(m.training for m in model.modules())  # dropout back to evaluation mode after the passes


def test_tta_averages_over_flips(classifier, tmp_path):
    images = phantom_pngs(tmp_path / "images", n=3)
    rows = predict_rows(classifier, tmp_path, "tta", "uncertainty=tta")
    assert list(rows[0]) == ["image", "p_0", "p_1", "prediction", "entropy", "std"]
    model = model_of(classifier)
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        passes = torch.stack(
            [model.postprocess(model(x.flip(axes) if axes else x)) for axes in [(), (2,), (3,), (2, 3)]]
        )
    probs = torch.tensor([[float(row["p_0"]), float(row["p_1"])] for row in rows])
    torch.testing.assert_close(probs, passes.mean(dim=0), atol=1e-5, rtol=0)
    predicted = passes.mean(dim=0).argmax(dim=1)
    std = passes.std(dim=0, correction=0)[torch.arange(3), predicted]
    torch.testing.assert_close(torch.tensor([float(row["std"]) for row in rows]), std, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["uncertainty=bayes"], r"uncertainty='bayes'; expected null or one of \['mc_dropout', 'tta'\]"),
        (["uncertainty=mc_dropout", "samples=1"], r"samples=1; expected an integer of at least 2"),
    ],
    ids=["method", "samples"],
)
def test_bad_uncertainty_options_name_the_key(tmp_path, overrides, message):
    cfg = compose_config(
        ["ckpt_path=never-read.ckpt", f"input={tmp_path}", f"output={tmp_path / 'out'}", *overrides],
        "predict",
        output_dir=tmp_path,
    )
    with pytest.raises(MedexpError, match=message):
        predict(cfg)
    assert not (tmp_path / "out").exists()


def test_uncertainty_needs_dropout_and_a_classifier(classifier):
    from medexp.inference.loop import Sampled, dropout_layers

    model = model_of(classifier)
    for layer in dropout_layers(model):
        layer.p = 0.0
    with pytest.raises(MedexpError, match=r"uncertainty=mc_dropout: the model \(SimpleCNN\) has no dropout layers"):
        Sampled(model, "mc_dropout", 8)
    Sampled(model, "tta", 8)  # flips need no dropout

    segmenter = instantiate(compose_config(["data=synthetic_seg", *TINY_UNET]).model, _convert_="all")
    with pytest.raises(MedexpError, match=r"uncertainty=tta: supported for classifiers only; .* SegmentationTask"):
        Sampled(segmenter, "tta", 8)

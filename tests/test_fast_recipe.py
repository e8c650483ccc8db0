"""The fast MedMNIST recipe and its switches: batch augmentation, mixup/CutMix, test-time
augmentation from the dataset's metadata, EMA weights, budget-aware schedules, channels-last and
torch.compile, each driven through `medexp train` / Hydra where it matters."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.data.batch_augment import (
    BatchAffine,
    BatchErase,
    BatchFlip,
    BatchIntensity,
    BatchTranslate,
    affine,
    mix,
    rotation,
    shift,
    tta_views,
)
from medexp.data.medmnist_info import FLIP_AXES, MEDMNIST
from medexp.tasks.classification import ordinal_cross_entropy, ordinal_targets
from medexp.tasks.schedules import BudgetSchedule
from medexp.train import train
from medexp.utils.config import build
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli
from tests.helpers import write_medmnist_npz

SPLITS = {"train": 96, "val": 32, "test": 32}
# the recipe's switches, one network at a time (its ensemble size: test_the_recipe_trains_as_many_networks_as_fit_its_budget)
FAST = [
    "experiment=medmnist_fast",
    *QUIET,
    "report=false",
    "extras.print_config=false",
    "data.batch_size=32",
    "model.ensemble=1",
]


@pytest.fixture
def breast(tmp_path) -> Path:
    write_medmnist_npz(tmp_path / "breastmnist.npz", SPLITS, num_classes=2)
    return tmp_path


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Path:
    """One `medexp train experiment=medmnist_fast` run (EMA, batch flips and shifts, one-cycle
    schedule, channels-last, plus mixup, batch rotations and zooms, Cutout, and test-time flips from
    the metadata), shared by the tests that evaluate, predict and export it."""
    root = tmp_path_factory.mktemp("fast")
    write_medmnist_npz(root / "breastmnist.npz", SPLITS, num_classes=2)
    run_cli(
        "train",
        *FAST,
        f"data.root={root}",
        "trainer.max_epochs=3",
        "model.mixup_alpha=0.2",
        "callbacks.ema.decay=0.9",
        "model.tta_flips=${data.flip_axes}",
        # the recipe's flips and shifts, plus rotations and zooms and Cutout
        "data.batch_augmentations=[{_target_:medexp.data.batch_augment.BatchFlip,axes:${data.flip_axes}},"
        "{_target_:medexp.data.batch_augment.BatchTranslate,pixels:2},"
        "{_target_:medexp.data.batch_augment.BatchAffine,degrees:15,scale:[0.9,1.1]},"
        "{_target_:medexp.data.batch_augment.BatchErase,size:8,prob:0.5}]",
        f"hydra.run.dir={root / 'run'}",
        cwd=root,
    )
    return root / "run"


# --- whole-batch augmentation ---------------------------------------------------------------


def test_shift_moves_each_sample_by_its_own_offset():
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).reshape(2, 1, 6, 7)
    offsets = torch.tensor([[1, -2], [0, 0]])
    out = shift(x, offsets, pixels=2)
    # sample 0 moved down 1 row and left 2 columns: the interior equals the original shifted
    assert torch.equal(out[0, 0, 1:, :-2], x[0, 0, :-1, 2:])
    assert torch.equal(out[1], x[1])
    # reflect padding fills the border from the image, not zeros
    assert torch.equal(out[0, 0, 0, :-2], x[0, 0, 1, 2:])


def test_batch_flip_and_translate_draw_per_sample():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    flipped = BatchFlip(axes=[1], prob=0.5)(x)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < int(mirrored.sum()) < 54
    assert torch.equal(BatchFlip(axes=[], prob=1.0)(x), x)
    assert torch.equal(BatchFlip(axes=[0, 1], prob=1.0)(x), x.flip(2).flip(3))
    moved = BatchTranslate(pixels=2)(x)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    with pytest.raises(MedexpError, match=r"BatchFlip axes=\[2\]; expected distinct spatial axes from \[0, 1\]"):
        BatchFlip(axes=[2])(x)
    with pytest.raises(MedexpError, match="BatchTranslate pixels=8 is not smaller than the images"):
        BatchTranslate(pixels=8)(x)
    with pytest.raises(MedexpError, match="BatchTranslate mode='wrap'; expected one of"):
        BatchTranslate(mode="wrap")


def test_affine_turns_square_and_oblong_images_and_volumes_about_their_centre():
    quarter = torch.deg2rad(torch.tensor([[90.0]]))
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    assert torch.allclose(affine(x, rotation(quarter), "zeros"), torch.rot90(x, -1, (2, 3)), atol=1e-4)
    # a 4x8 image: the middle 4x4 turns as a square does (pixel units, no shear from the aspect)
    oblong = torch.arange(32, dtype=torch.float32).reshape(1, 1, 4, 8)
    turned = affine(oblong, rotation(quarter), "zeros")
    assert torch.allclose(turned[..., 2:6], torch.rot90(oblong[..., 2:6], -1, (2, 3)), atol=1e-4)
    assert turned[..., :2].abs().max() < 1e-4
    volume = torch.arange(64, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    for axis in range(3):
        angles = torch.zeros(1, 3)
        angles[0, axis] = torch.pi / 2
        plane = [d for d in (2, 3, 4) if d != 2 + axis]
        assert torch.allclose(affine(volume, rotation(angles), "zeros"), torch.rot90(volume, -1, plane), atol=1e-4)


def test_batch_affine_draws_per_sample_and_refuses_bad_values():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 12, 12)
    assert torch.equal(BatchAffine(degrees=0, scale=(1, 1))(x), x)
    assert torch.equal(BatchAffine(degrees=30, prob=0.0)(x), x)
    moved = BatchAffine(degrees=30, scale=(0.8, 1.25), prob=0.5)(x)
    unchanged = (moved - x).abs().flatten(1).amax(1) < 1e-5
    assert moved.shape == x.shape and 10 < int(unchanged.sum()) < 54
    # a zoom by 2 keeps the centre and spreads it: the middle 2x2 of an 8x8 covers 4 times the
    # area (bilinearly), the border stays empty
    image = torch.zeros(1, 1, 8, 8)
    image[..., 3:5, 3:5] = 1.0
    zoomed = BatchAffine(degrees=0, scale=(2, 2))(image)
    assert float(zoomed.sum()) == pytest.approx(16.0) and zoomed[..., 3:5, 3:5].min() == pytest.approx(1.0)
    assert zoomed[..., 0, :].abs().max() < 1e-6 and zoomed[..., 1:7, 1:7].min() > 0
    # a volume turns about its three axes; integers come back as integers
    assert BatchAffine(degrees=20)(torch.rand(3, 1, 6, 6, 6)).shape == (3, 1, 6, 6, 6)
    assert BatchAffine(degrees=20)(torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8)).dtype == torch.uint8
    for kwargs, message in (
        ({"degrees": 200}, r"BatchAffine degrees=200; expected a number of degrees in \[0, 180\]"),
        ({"scale": [1.2, 0.9]}, r"BatchAffine scale=\[1.2, 0.9\]; expected \[low, high\] zoom factors"),
        ({"mode": "wrap"}, r"BatchAffine mode='wrap'; expected one of"),
        ({"prob": 2.0}, r"BatchAffine prob=2.0; expected a probability"),
    ):
        with pytest.raises(MedexpError, match=message):
            BatchAffine(**kwargs)
    with pytest.raises(MedexpError, match=r"BatchAffine takes 2D or 3D images; got a batch shaped \(4, 1, 9\)"):
        BatchAffine()(torch.rand(4, 1, 9))


def affine_fit(out: torch.Tensor, x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """The least-squares factor of ``out - mean = c (x - mean)`` over ``dims``, and the largest residual."""
    xc, oc = x - x.mean(dims, keepdim=True), out - out.mean(dims, keepdim=True)
    factor = (xc * oc).sum(dims, keepdim=True) / (xc * xc).sum(dims, keepdim=True)
    return factor.flatten(), float((oc - factor * xc).abs().max())


def test_batch_erase_blanks_one_square_per_chosen_sample():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 28, 28) + 1  # no pixel is 0 before erasing
    out = BatchErase(size=8, prob=0.5)(x)
    blank = out == 0
    assert torch.equal(out[~blank], x[~blank])
    # the same square in every channel, about half the samples erased
    assert torch.equal(blank[:, :1].expand_as(blank), blank)
    chosen = blank[:, 0].flatten(1).any(dim=1)
    assert 0.4 < float(chosen.float().mean()) < 0.6
    for mask in blank[chosen, 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        # one solid rectangle, 8 a side unless the border cut it
        assert int(mask.sum()) == len(rows) * len(cols) and 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert int(rows[-1] - rows[0]) == len(rows) - 1 and int(cols[-1] - cols[0]) == len(cols) - 1
        assert len(rows) == 8 or rows[0] == 0 or rows[-1] == 27
    # away from the borders most squares are whole
    assert int((blank[:, 0].flatten(1).sum(dim=1) == 64).sum()) > 50
    volume = BatchErase(size=3, prob=1.0, value=-1.0)(torch.zeros(2, 1, 6, 6, 6))
    assert bool(((volume == -1).flatten(1).sum(dim=1) >= 1).all()) and int((volume == -1).sum()) <= 54
    assert torch.equal(BatchErase(prob=0.0)(x), x)
    for kwargs, message in (
        ({"size": 0}, "BatchErase size=0; expected a whole number of pixels >= 1"),
        ({"prob": 1.5}, r"BatchErase prob=1.5; expected a probability in \[0, 1\]"),
        ({"value": "mean"}, "BatchErase value='mean'; expected a number"),
    ):
        with pytest.raises(MedexpError, match=message):
            BatchErase(**kwargs)
    with pytest.raises(MedexpError, match=r"BatchErase size=8 is larger than the images \(6, 6\)"):
        BatchErase(size=8)(torch.zeros(1, 1, 6, 6))


def test_batch_intensity_jitters_contrast_and_brightness_per_sample():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    assert torch.equal(BatchIntensity(brightness=0, contrast=0)(x), x)
    out = BatchIntensity(brightness=0.2, contrast=0.3)(x)
    # each sample: one contrast factor in [0.7, 1.3] for all its channels, its mean moved by at most 0.2
    factor, residual = affine_fit(out, x, (1, 2, 3))
    offset = out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))
    assert residual < 1e-5 and float(factor.std()) > 0.05
    assert bool(((factor > 0.7 - 1e-5) & (factor < 1.3 + 1e-5)).all())
    assert bool((offset.abs() <= 0.2 + 1e-5).all()) and float(offset.std()) > 0.02
    # per_channel: a colour jitter, one factor per sample and channel
    coloured = BatchIntensity(brightness=0.2, contrast=0.3, per_channel=True)(x)
    assert affine_fit(coloured, x, (1, 2, 3))[1] > 1e-2
    factor, residual = affine_fit(coloured, x, (2, 3))
    assert residual < 1e-5 and float(factor.view(32, 3).std(dim=1).mean()) > 0.05
    assert BatchIntensity()(torch.randint(0, 255, (2, 1, 4, 4), dtype=torch.uint8)).dtype == torch.float32
    for kwargs, message in (
        ({"brightness": -0.1}, r"BatchIntensity brightness=-0.1; expected a number >= 0"),
        ({"contrast": 1.0}, r"BatchIntensity contrast=1.0; expected a number in \[0, 1\)"),
        ({"per_channel": "no"}, r"BatchIntensity per_channel='no'; expected true or false"),
    ):
        with pytest.raises(MedexpError, match=message):
            BatchIntensity(**kwargs)


SEG = [
    "data=synthetic_seg",
    "data.image_size=16",
    "data.num_samples={train: 32, val: 16, test: 16}",
    "data.batch_size=16",
]
MOVES = (
    "data.batch_augmentations=[{_target_: medexp.data.batch_augment.BatchFlip, axes: [0, 1], prob: 0.5},"
    " {_target_: medexp.data.batch_augment.BatchTranslate, pixels: 3, mode: constant}]"
)


def test_batch_augmentations_move_segmentation_masks_with_their_images(tmp_path):
    """A flip or shift of a segmentation batch moves the mask with its image (one draw for both);
    a resampling that would blend label values is refused before anything trains."""
    tiny_unet = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]
    cfg = compose_config([*SEG, *tiny_unet, MOVES, *QUIET, "trainer.max_epochs=1"], output_dir=tmp_path / "run")
    data = build(cfg.data)
    data.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.trainer.training = True
    torch.manual_seed(0)
    image = torch.randn(64, 1, 16, 16)
    label = (image > 0).long()  # a mask that is a function of its pixel: any pure move keeps it so
    moved = data.on_after_batch_transfer({"image": image, "label": label}, 0)
    assert moved["label"].dtype == torch.int64 and moved["label"].shape == label.shape
    assert not torch.equal(moved["image"], image)
    assert torch.equal(moved["label"], (moved["image"] > 0).long())
    # validation batches pass unchanged
    data.trainer.validating = True
    assert data.on_after_batch_transfer({"image": image, "label": label}, 0)["image"] is image
    # through `medexp train`: trains with both moves; BatchAffine is refused in one line
    medexp_main("train", *SEG, *tiny_unet, MOVES, *QUIET, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["test/dice"] >= 0.0
    affine_aug = "data.batch_augmentations=[{_target_: medexp.data.batch_augment.BatchAffine, degrees: 10}]"
    result = medexp_main("train", *SEG, *tiny_unet, affine_aug, "hydra.run.dir=bad", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "data.batch_augmentations.0: BatchAffine cannot move segmentation masks with their images" in result.stderr
    assert "Traceback" not in result.stderr
    # an intensity jitter changes the images only: the mask stays as it was
    cfg = compose_config(
        [*SEG, *tiny_unet, "data.batch_augmentations=[{_target_: medexp.data.batch_augment.BatchIntensity}]", *QUIET],
        output_dir=tmp_path / "intensity",
    )
    data = build(cfg.data)
    data.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.trainer.training = True
    jittered = data.on_after_batch_transfer({"image": image, "label": label}, 0)
    assert torch.equal(jittered["label"], label) and not torch.equal(jittered["image"], image)


def test_mixup_and_cutmix_mix_with_the_lambda_they_report():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 10, 10)
    mixed, perm, lam = mix(x, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    mixed, perm, lam = mix(x, mixup_alpha=0.0, cutmix_alpha=1.0)
    moved = perm != torch.arange(16)
    from_other = ((mixed == x[perm]) & (mixed != x))[moved]
    # the share of pixels pasted from the other image is 1 - lam, the same box in every image
    assert moved.any() and float(from_other.float().mean()) == pytest.approx(1 - lam, abs=1e-6)
    assert ((mixed == x) | (mixed == x[perm])).all()


def test_tta_views_are_every_flip_combination_and_shifts():
    x = torch.rand(2, 1, 8, 8)
    assert len(tta_views(x, [], 0)) == 1
    views = tta_views(x, [0, 1], 0)
    assert len(views) == 4 and torch.equal(views[3], x.flip(2).flip(3))
    assert len(tta_views(x, [1], 1)) == 6


# --- the dataset's flip axes and the recipe's composition -----------------------------------


def test_every_medmnist_dataset_names_its_flip_axes_and_the_recipe_reads_them(tmp_path):
    assert set(FLIP_AXES) == set(MEDMNIST)
    # left and right matter in chest X-rays and in the organ sets (femur-left/right are classes)
    for name in ("chestmnist", "pneumoniamnist", "organamnist", "organcmnist", "organsmnist"):
        assert FLIP_AXES[name] == []
    for name in sorted(n for n, info in MEDMNIST.items() if info["dims"] == 2):
        cfg = compose_config([*FAST, f"data.name={name}", f"data.root={tmp_path}"], output_dir=tmp_path)
        assert list(cfg.data.batch_augmentations[0].axes) == FLIP_AXES[name]
        assert cfg.model.tta_flips is None  # test-time flips measured no gain on validation
        with_tta = compose_config([*FAST, f"data.name={name}", "model.tta_flips=${data.flip_axes}"])
        assert list(with_tta.model.tta_flips) == FLIP_AXES[name]
        assert cfg.model.net.num_classes == len(MEDMNIST[name]["labels"])
    gpu = compose_config(["experiment=medmnist_fast_gpu", "data.name=retinamnist"], output_dir=tmp_path)
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed" and gpu.model.compile
    assert gpu.callbacks.ema.decay == 0.99 and gpu.model.net.block_inplanes == [32, 64, 128, 256]
    assert (gpu.data.batch_size, gpu.optimizer.lr) == (256, 2 * cfg.optimizer.lr)  # square-root scaling
    # overridable in one place
    cfg = compose_config([*FAST, "data.name=breastmnist", "data.flip_axes=[]"], output_dir=tmp_path)
    assert list(cfg.data.batch_augmentations[0].axes) == []


def test_the_recipe_trains_as_many_networks_as_fit_its_budget(breast):
    """150k training image passes (members x epochs x the official training split), 1 to 3
    networks: the small sets get three, the large ones one, and fewer epochs leave room for more."""
    expected = {
        ("breastmnist", 40): 3,  # 546 images
        ("retinamnist", 40): 3,  # 1,080
        ("pneumoniamnist", 40): 1,  # 4,708
        ("pathmnist", 40): 1,  # 89,996
        ("breastmnist", 120): 2,
        ("retinamnist", 80): 1,
        ("breastmnist", -1): 1,  # epochs without an end: max_time bounds the run
    }
    recipe = [o for o in FAST if o != "model.ensemble=1"]
    for (name, epochs), members in expected.items():
        cfg = compose_config([*recipe, f"data.name={name}", f"trainer.max_epochs={epochs}"], output_dir=breast)
        assert cfg.model.ensemble == members, (name, epochs)
    # through `medexp train`: the checkpoint holds the three networks and tests their mean
    medexp_main("train", *recipe, f"data.root={breast}", "trainer.max_epochs=1", "hydra.run.dir=run", cwd=breast)
    model = Checkpoint(breast / "run" / "checkpoints" / "best.ckpt").build_model()
    assert len(model.net.members) == 3 and model.hparams.ensemble == 3
    assert 0.0 <= json.loads((breast / "run" / "metrics.json").read_text())["test"]["test/auroc"] <= 1.0


def test_the_benchmarks_spend_budget_variant_fills_the_budget_with_epochs(breast):
    """The benchmark's ``spend_budget`` variant (its overrides, as the script passes them): as many
    networks as fit 40 epochs, then as many epochs as fill 150k training image passes."""
    import runpy

    script = Path(__file__).parents[1] / "scripts" / "benchmark_medmnist_fast.py"
    overrides = runpy.run_path(str(script))["VARIANTS"]["spend_budget"]
    recipe = [o for o in FAST if o != "model.ensemble=1"]
    for name, members, epochs in (
        ("breastmnist", 3, 91),  # 546 images: 3 x 91 x 546 = 149,058 passes
        ("retinamnist", 3, 46),  # 1,080
        ("pneumoniamnist", 1, 40),  # 4,708: 40 epochs at least
        ("pathmnist", 1, 40),
    ):
        cfg = compose_config([*recipe, f"data.name={name}", *overrides], output_dir=breast)
        assert (cfg.model.ensemble, cfg.trainer.max_epochs) == (members, epochs), name


def test_every_benchmark_variant_composes_and_builds_its_augmentations(breast):
    """Each variant of scripts/benchmark_medmnist_fast.py is a valid override list on the recipe,
    and its batch augmentations build (a typo would surface only minutes into a benchmark)."""
    import runpy

    script = Path(__file__).parents[1] / "scripts" / "benchmark_medmnist_fast.py"
    for name, overrides in runpy.run_path(str(script))["VARIANTS"].items():
        cfg = compose_config([*FAST, f"data.root={breast}", *overrides], output_dir=breast / "run")
        augment = [type(a).__name__ for a in build(cfg.data).batch_augmentations]
        assert augment[:2] == ["BatchFlip", "BatchTranslate"] or augment == [], name
    recipe = compose_config([*FAST, f"data.root={breast}"], output_dir=breast / "run")
    assert [type(a).__name__ for a in build(recipe.data).batch_augmentations] == [
        "BatchFlip",
        "BatchTranslate",
        "BatchIntensity",
    ]


def test_bad_flip_axes_and_tta_options_are_one_line_errors(breast):
    cfg = compose_config([*FAST, f"data.root={breast}", "data.flip_axes=[3]"], output_dir=breast / "run")
    with pytest.raises(MedexpError, match=r"data.flip_axes=\[3\]; expected distinct spatial axes from \[0, 1\]"):
        build(cfg.data)
    for override, message in (
        ("model.tta_shift=-1", r"model.tta_shift=-1; expected a whole number of pixels >= 0"),
        ("model.mixup_alpha=-0.2", r"model.mixup_alpha=-0.2; expected a number >= 0"),
        ("model.mix_prob=2", r"model.mix_prob=2; expected a probability in \[0, 1\]"),
    ):
        with pytest.raises(MedexpError, match=message):
            build(compose_config([*FAST, f"data.root={breast}", override], output_dir=breast / "run").model)


# --- the task's mixup and test-time augmentation ---------------------------------------------


def classifier(*overrides: str, root: Path):
    return build(compose_config([*FAST, f"data.root={root}", *overrides], output_dir=root / "run").model)


def test_mixed_batches_are_scored_against_both_labels(breast):
    torch.manual_seed(0)
    model = classifier("model.mixup_alpha=1.0", "model.label_smoothing=0.0", root=breast)
    batch = {"image": torch.randn(8, 1, 28, 28), "label": torch.randint(0, 2, (8,))}
    mixed = model.prepare_batch(batch, "train")
    assert not torch.equal(mixed["image"], batch["image"])
    lam, perm = float(mixed["mix_lambda"]), mixed["mix_index"]
    logits = model(mixed["image"])
    expected = lam * nn.functional.cross_entropy(logits, batch["label"]) + (1 - lam) * nn.functional.cross_entropy(
        logits, batch["label"][perm]
    )
    assert torch.allclose(model.batch_loss(logits, mixed), expected)
    # never outside training
    assert model.prepare_batch(batch, "val")["image"] is batch["image"]


def test_test_time_flips_average_the_logits_of_the_views(breast):
    model = classifier("model.tta_flips=[1]", "model.tta_shift=1", root=breast).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = torch.stack([model(view) for view in tta_views(x, [1], 1)]).mean(0)
        assert torch.allclose(model.infer(x), expected, atol=1e-6)
        assert not torch.allclose(model.infer(x), model(x), atol=1e-4)
    plain = classifier("model.tta_flips=null", root=breast).eval()
    with torch.no_grad():
        assert torch.equal(plain.infer(x), plain(x))


def test_class_weights_train_with_ema_weights(breast):
    """model.class_weights=auto with the recipe's EMA: the weights, computed when the run starts,
    are no model state, so the averaged copy lines up with the model (it failed in validation)."""
    medexp_main(
        "train",
        *FAST,
        f"data.root={breast}",
        "model.class_weights=auto",
        "trainer.max_epochs=1",
        "hydra.run.dir=run",
        cwd=breast,
    )
    model = Checkpoint(breast / "run" / "checkpoints" / "best.ckpt").build_model()
    assert model.hparams.class_weights == "auto" and "class_weight" not in model.state_dict()
    assert 0.0 <= json.loads((breast / "run" / "metrics.json").read_text())["test"]["test/auroc"] <= 1.0


# --- ordinal label smoothing ---------------------------------------------------------------


def test_ordinal_smoothing_spreads_to_neighbouring_grades():
    soft = ordinal_targets(torch.tensor([0, 2]), 5, 0.1)
    assert torch.allclose(soft.sum(1), torch.ones(2))
    # grade 0: 0.9 on it, the rest falling with the distance; grade 2: symmetric about it
    assert soft[0, 0] > 0.9 and bool((soft[0, :-1] > soft[0, 1:]).all())
    assert soft[1, 1] == soft[1, 3] and soft[1, 1] > soft[1, 0] == soft[1, 4]
    # s in proportion to exp(-distance): grade 0's distances are 0..4
    assert torch.allclose(soft[0, 1:], 0.1 * torch.exp(-torch.arange(1.0, 5)) / torch.exp(-torch.arange(5.0)).sum())
    logits, grades = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 4])
    # no smoothing: the plain cross-entropy, with and without class weights
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.allclose(ordinal_cross_entropy(logits, grades, 0.0), nn.functional.cross_entropy(logits, grades))
    assert torch.allclose(
        ordinal_cross_entropy(logits, grades, 0.0, weight), nn.functional.cross_entropy(logits, grades, weight=weight)
    )
    assert not torch.allclose(
        ordinal_cross_entropy(logits, grades, 0.1), nn.functional.cross_entropy(logits, grades, label_smoothing=0.1)
    )


def test_ordinal_smoothing_reads_the_metadata_and_trains_through_medexp_train(tmp_path):
    write_medmnist_npz(tmp_path / "retinamnist.npz", SPLITS, num_classes=5, channels=3)
    ordinal = "model.ordinal_smoothing=${data.ordinal}"
    for name, expected in (("retinamnist", True), ("breastmnist", False), ("dermamnist", False)):
        cfg = compose_config([*FAST, f"data.name={name}", ordinal], output_dir=tmp_path)
        assert cfg.model.ordinal_smoothing is expected and cfg.data.ordinal is expected, name
    medexp_main(
        "train",
        *FAST,
        "data.name=retinamnist",
        f"data.root={tmp_path}",
        ordinal,
        "trainer.max_epochs=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert 0.0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["test/auroc"] <= 1.0
    model = Checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt").build_model()
    assert model.hparams.ordinal_smoothing is True and model.hparams.label_smoothing == 0.1
    logits, grades = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(model.compute_loss(logits, grades), ordinal_cross_entropy(logits, grades, 0.1))
    # refused where the classes are not grades of one scale, or with another loss
    for bad, match in (
        (["data.name=chestmnist"], "task='multilabel'"),
        (["data.name=retinamnist", "model.loss=focal"], "loss='focal'"),
    ):
        cfg = compose_config(
            [*FAST, f"data.root={tmp_path}", *bad, "model.ordinal_smoothing=true"], output_dir=tmp_path
        )
        with pytest.raises(MedexpError, match=rf"model.ordinal_smoothing=true needs .*{match}"):
            build(cfg.model)


# --- EMA weights ----------------------------------------------------------------------------


def test_ema_weights_are_validated_tested_saved_and_evaluated(fast_run):
    """With callbacks.ema the checkpoint's weights are the average (the raw ones kept for resuming),
    the validation score that chose it is the average's, and train's test metrics equal
    `medexp eval` of the checkpoint."""
    from medexp.eval import evaluate

    metrics = json.loads((fast_run / "metrics.json").read_text())
    ckpt = fast_run / "checkpoints" / "best.ckpt"
    contents = Checkpoint(ckpt).contents
    averaged, raw = contents["state_dict"], contents["current_model_state"]
    assert any(not torch.equal(averaged[name], raw[name]) for name in averaged if name.startswith("net."))
    evaluated = evaluate(compose_config([f"ckpt_path={ckpt}", "splits=[val,test]"], "eval", fast_run.parent / "ev"))
    monitor = OmegaConf.load(fast_run / ".hydra" / "config.yaml").model.monitor  # the recipe's: val/loss
    assert evaluated["val"][monitor] == pytest.approx(metrics["best_score"], abs=1e-6)
    assert evaluated["test"]["test/auroc"] == pytest.approx(metrics["test"]["test/auroc"], abs=1e-6)


def test_ema_off_and_bad_decay(breast, caplog):
    import logging

    from medexp.callbacks.averaging import EMA

    caplog.set_level(logging.INFO)

    with pytest.raises(MedexpError, match=r"callbacks.ema.decay=1.5; expected a number in \(0, 1\)"):
        EMA(decay=1.5)
    out = breast / "off"
    train(
        compose_config(
            [*FAST, f"data.root={breast}", "trainer.max_epochs=1", "callbacks.ema.decay=null"], output_dir=out
        )
    )
    assert "current_model_state" not in Checkpoint(out / "checkpoints" / "best.ckpt").contents
    # off, it is silent: no "You're using the WeightAveraging callback" at every checkpoint
    assert "WeightAveraging" not in caplog.text


# --- schedules over the budget --------------------------------------------------------------


class Tiny(L.LightningModule):
    """A linear model on random data whose steps sleep, to make time the budget."""

    def __init__(self, scheduler: dict, sleep: float = 0.0) -> None:
        super().__init__()
        self.layer, self.options, self.sleep, self.lrs = nn.Linear(4, 1), scheduler, sleep, []

    def training_step(self, batch, batch_idx):
        if self.sleep:
            import time

            time.sleep(self.sleep)
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)), batch_size=4)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = BudgetSchedule(optimizer, **self.options)
        scheduler.attach_budget(self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_tiny(model: Tiny, **trainer: object) -> list[float]:
    L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer
    ).fit(model)
    return model.lrs


def test_one_cycle_spans_the_step_budget():
    lrs = fit_tiny(Tiny({"warmup": 0.25, "shape": "linear", "start": 0.1}), max_epochs=4)  # 40 steps
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0, abs=0.05)
    assert lrs.index(max(lrs)) == 10 and lrs[-1] == pytest.approx(1 - (39 / 40 - 0.25) / 0.75, abs=1e-6)
    cosine = fit_tiny(Tiny({"warmup": 0.0, "shape": "cosine", "start": 1.0}), max_steps=20)
    assert cosine[0] == 1.0 and cosine[10] == pytest.approx(0.5) and cosine[-1] < 0.01


def test_schedule_follows_the_clock_when_max_time_ends_the_run():
    """1000 epochs will not fit in 2 seconds: the schedule ends with the time instead."""
    lrs = fit_tiny(
        Tiny({"warmup": 0.0, "shape": "linear", "start": 1.0}, sleep=0.05), max_epochs=1000, max_time={"seconds": 2}
    )
    assert 10 < len(lrs) < 60 and lrs[-1] < 0.15 and lrs[len(lrs) // 2] == pytest.approx(0.5, abs=0.15)


def test_schedule_without_an_end_is_refused():
    with pytest.raises(MedexpError, match="the run has no end: set trainer.max_epochs, trainer.max_steps"):
        fit_tiny(Tiny({}), max_epochs=-1)


# --- the recipe end to end, channels-last and compile ---------------------------------------


def test_fast_recipe_trains_tests_and_predicts_with_its_switches(fast_run):
    """The recipe's run records its switches; `medexp predict` applies the same test-time flips."""
    metrics = json.loads((fast_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/auroc"] <= 1.0
    ckpt = fast_run / "checkpoints" / "best.ckpt"
    cfg = Checkpoint(ckpt).config
    assert cfg["model"]["tta_flips"] == [1] and cfg["scheduler"]["_target_"].endswith("BudgetSchedule")
    assert [a["_target_"].rsplit(".", 1)[1] for a in cfg["data"]["batch_augmentations"]] == [
        "BatchFlip",
        "BatchTranslate",
        "BatchAffine",
        "BatchErase",
    ]
    # one cycle over the run's 9 optimiser steps (3 epochs of 3 batches), stepped per step: the
    # learning rate logged at the start of each epoch rises past the peak (step 2) and falls again
    log = next(fast_run.glob("csv/**/metrics.csv"))
    lrs = [float(r["lr-AdamW"]) for r in csv.DictReader(log.open()) if r.get("lr-AdamW")]
    peak = cfg["optimizer"]["lr"]
    assert len(lrs) == 3 and lrs[0] == pytest.approx(0.1 * peak) and lrs[1] > lrs[2] > lrs[0]
    assert lrs[1] == pytest.approx(peak * (1 - (3 / 9 - 0.25) / 0.75))
    model = Checkpoint(ckpt).build_model().eval()
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # test-time flips along the columns make a prediction the same for an image and its mirror
    from PIL import Image

    folder = fast_run.parent / "pngs"
    folder.mkdir()
    image = torch.randint(0, 255, (28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
    Image.fromarray(image).save(folder / "a.png")
    Image.fromarray(image[:, ::-1].copy()).save(folder / "b.png")
    medexp_main("predict", f"ckpt_path={ckpt}", "input=*.png", "output=preds", "hydra.run.dir=p", cwd=folder)
    rows = {Path(r["image"]).name: r for r in csv.DictReader(next((folder / "preds").glob("*.csv")).open())}
    # one probability column per class, named by the class
    probs = [float(rows[name][key]) for name in ("a.png", "b.png") for key in ("malignant", "normal, benign")]
    assert probs[:2] != pytest.approx([0.5, 0.5], abs=1e-4)
    assert probs[:2] == pytest.approx(probs[2:], abs=1e-6)


def test_channels_last_in_2d_and_3d_keeps_the_outputs(tmp_path):
    from medexp.nets.simple_cnn import SimpleCNN
    from medexp.tasks.classification import ClassificationTask

    for dims in (2, 3):
        torch.manual_seed(0)
        net = SimpleCNN(dims, 1, 2, channels=(4, 8)).eval()
        x = torch.randn(2, 1, *[8] * dims)
        expected = net(x)
        task = ClassificationTask(net, "binary", 2, optimizer=torch.optim.SGD, channels_last=True).eval()
        layout = torch.channels_last if dims == 2 else torch.channels_last_3d
        assert net.features[0].conv.weight.is_contiguous(memory_format=layout)
        assert torch.allclose(task(x), expected, atol=1e-5)


def test_compile_trains_the_net_compiled_and_saves_plain_names(breast):
    """model.compile with options (the eager backend: dynamo's capture without a C++ build, which
    the default inductor backend needs and takes a minute for); checkpoints keep the plain names."""
    out = breast / "compiled"
    run_cli(
        "train",
        *FAST,
        f"data.root={breast}",
        "trainer.max_epochs=1",
        "model.compile={backend: eager}",
        "model.tta_flips=null",
        "callbacks.ema.decay=null",
        f"hydra.run.dir={out}",
        cwd=breast,
    )
    assert "model.compile: ResNet compiled with torch.compile(backend='eager')" in (out / "train.log").read_text()
    names = list(Checkpoint(out / "checkpoints" / "best.ckpt").contents["state_dict"])
    assert names and not any("_orig_mod" in name for name in names)


def test_exports_carry_the_test_time_flips(fast_run, tmp_path):
    """A MONAI bundle and an ONNX file of a model with test-time flips give medexp predict's
    probabilities; a bundle cannot express shifts, and says so in one line."""
    from medexp.checkpoints.checkpoint import load_checkpoint
    from medexp.export import export

    ckpt = fast_run / "checkpoints" / "best.ckpt"
    metadata = export(
        compose_config(
            [f"ckpt_path={ckpt}", "format=bundle", f"output={tmp_path / 'bundle'}", "verify.batches=1"],
            "export",
            output_dir=tmp_path / "ex",
        )
    )
    record = json.loads(metadata.read_text())["medexp"]
    assert record["tta_flip_dims"] == [[], [3]] and record["verification"]["passed"] is True
    onnx = export(
        compose_config(
            [f"ckpt_path={ckpt}", "format=onnx", f"output={tmp_path / 'onnx'}"], "export", output_dir=tmp_path / "ex2"
        )
    )
    verification = json.loads(onnx.read_text())["verification"]
    assert (onnx.parent / "model.onnx").is_file() and verification["passed"] and verification["max_abs_diff"] < 1e-4
    contents = load_checkpoint(ckpt)
    contents["medexp_config"]["model"]["tta_shift"] = 1
    torch.save(contents, tmp_path / "shifted.ckpt")
    with pytest.raises(MedexpError, match="model.tta_shift=1: a MONAI bundle expresses test-time flips, not shifts"):
        export(
            compose_config(
                [f"ckpt_path={tmp_path / 'shifted.ckpt'}", "format=bundle", f"output={tmp_path / 'b2'}"],
                "export",
                output_dir=tmp_path / "ex3",
            )
        )


class Recorder(L.LightningModule):
    """A linear model that records the weight each validation runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.validated = nn.Linear(4, 1), []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(self.layer.weight.detach().clone())

    def loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)

    train_dataloader = val_dataloader = loader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_validation_after_fit_runs_on_the_checkpoint_it_loads(tmp_path):
    """`trainer.validate(ckpt_path=<an earlier epoch>)` after an EMA fit validates that epoch's
    averaged weights (what medexp train's re-validation of best.ckpt does), not the last average."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medexp.callbacks.averaging import EMA

    model = Recorder()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[EMA(decay=0.5), saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    first = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["state_dict"]["layer.weight"]
    assert not torch.equal(first, model.layer.weight.detach())
    trainer.validate(model, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert torch.equal(model.validated[-1], first)


def test_the_benchmarks_held_out_phase_scores_fold_checkpoints_on_the_official_validation_split(breast):
    """``benchmark_medmnist_fast.py held_out``: the recipe trains on cross-validation folds of the
    training split, then each fold run's best.ckpt and last.ckpt are scored on the official
    validation split (32 images here; a fold holds 19 or 20), which no fold run has seen, and
    beside it on the run's own fold, read from its log."""
    import subprocess
    import sys

    from tests.conftest import ENV

    script = Path(__file__).parents[1] / "scripts" / "benchmark_medmnist_fast.py"
    out = breast / "held_out.jsonl"
    base = ["model.ensemble=1", "trainer.max_epochs=2", "data.batch_size=32", "report=false"]
    command = [sys.executable, str(script), "held_out", "--data-root", str(breast), "--datasets", "breastmnist"]
    command += ["--variants", "recipe", "--folds", "0", "1", "--log-dir", str(breast / "logs"), "--out", str(out)]
    run = subprocess.run(
        [*command, "--base", *base], cwd=breast, env=ENV, check=True, capture_output=True, text=True, timeout=600
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["fold"], r["checkpoint"]) for r in rows] == [(0, "best"), (0, "last"), (1, "best"), (1, "last")]
    # the two adoption measures, printed: best.ckpt on the official split, last.ckpt on its own fold
    best = [(r["val_auc"] + r["val_acc"]) / 2 for r in rows if r["checkpoint"] == "best"]
    last = [(r["fold_val_auc"] + r["fold_val_acc"]) / 2 for r in rows if r["checkpoint"] == "last"]
    measures = (
        f"recipe: (1) best.ckpt on official val {sum(best) / 2:.4f}; (2) last.ckpt on own fold {sum(last) / 2:.4f}"
    )
    assert measures in run.stdout.splitlines()
    assert all(r["images"] == SPLITS["val"] and 0.0 <= r["val_auc"] <= 1.0 for r in rows)
    assert all(r["epoch"] == 1 for r in rows if r["checkpoint"] == "last")
    for fold in (0, 1):  # each fold run validated, and picked best.ckpt, on its own fold of the training split
        fold_row = json.loads((breast / f"held_out_fold{fold}.jsonl").read_text().splitlines()[0])
        assert fold_row["overrides"][-1] == f"data.fold={fold}"
        best = next(r for r in rows if (r["fold"], r["checkpoint"]) == (fold, "best"))
        assert best["fold_val_auc"] == pytest.approx(fold_row["val_auc"], abs=1e-6)

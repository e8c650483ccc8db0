"""GANs end to end: training with both optimisers, sample grids, `medexp sample`, domain FID/KID
on a medexp classifier's features, GAN-augmented classification, and the adversarial losses (bce, hinge,
wgan_gp)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from medexp.tasks.adversarial import discriminator_loss, generator_loss, gradient_penalty
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli

TINY = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 128, val: 32, test: 32}",
    "data.batch_size=16",
    "trainer.log_every_n_steps=4",
]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A conditional GAN trained for 2 epochs through the command line, as a user runs it."""
    cwd = tmp_path_factory.mktemp("gan")
    run_cli(
        "train",
        "model=gan",
        "model.conditional=true",
        "model.latent_size=16",
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.sample_grids.num_samples=8",
        "hydra.run.dir=run",
        cwd=cwd,
    )
    return cwd / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A classifier on the same data: its features measure the GAN's samples."""
    out = tmp_path_factory.mktemp("classifier")
    train(
        compose_config(
            [
                *TINY,
                "data.num_samples={train: 256, val: 32, test: 64}",
                "trainer.max_epochs=4",
                "optimizer.lr=3e-3",
                "test=false",
            ],
            output_dir=out,
        )
    )
    return out


def test_a_gan_steps_both_optimisers_and_draws_sample_grids(gan_run):
    checkpoint = torch.load(gan_run / "checkpoints" / "last.ckpt", weights_only=True)
    states = checkpoint["optimizer_states"]
    assert len(states) == 2, "one optimiser for the generator, one for the discriminator"
    # Adam counts its steps per parameter: both took one per batch (128 / 16 = 8 per epoch)
    assert [int(next(iter(state["state"].values()))["step"]) for state in states] == [16, 16]
    metrics = json.loads((gan_run / "metrics.json").read_text())
    for name in ("loss", "d_loss", "d_real", "d_fake"):
        assert np.isfinite(metrics["test"][f"test/{name}"])
    assert 0 < metrics["test"]["test/d_real"] < 1 and 0 < metrics["test"]["test/d_fake"] < 1
    grids = sorted(p.name for p in (gan_run / "samples").glob("epoch_*.png"))
    assert grids == ["epoch_000.png", "epoch_001.png"]


def test_medexp_sample_writes_a_grid_and_an_npz(gan_run, tmp_path):
    ckpt = gan_run / "checkpoints" / "last.ckpt"
    medexp_main("sample", f"ckpt_path={ckpt}", "n=10", "output=out", "seed=3", "hydra.run.dir=log", cwd=tmp_path)
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (10, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0  # the synthetic data's intensity range
    assert labels.tolist() == [0] * 5 + [1] * 5  # a conditional GAN's classes in blocks
    from PIL import Image

    assert Image.open(tmp_path / "out" / "samples.png").size == (4 * 18 + 2, 3 * 18 + 2)  # 4 columns, 3 rows

    # the same seed, the same images; one class on request
    medexp_main("sample", f"ckpt_path={ckpt}", "n=10", "output=again", "seed=3", "hydra.run.dir=log", cwd=tmp_path)
    with np.load(tmp_path / "again" / "samples.npz") as npz:
        assert np.array_equal(npz["images"], images)
    medexp_main("sample", f"ckpt_path={ckpt}", "n=4", "output=ones", "label=1", "hydra.run.dir=log", cwd=tmp_path)
    with np.load(tmp_path / "ones" / "samples.npz") as npz:
        assert npz["labels"].tolist() == [1, 1, 1, 1]

    wrong = medexp_main(
        "sample", f"ckpt_path={ckpt}", "n=4", "output=x", "label=2", "hydra.run.dir=log", cwd=tmp_path, check=False
    )
    assert wrong.returncode != 0 and "label=2; this GAN generates classes 0..1" in wrong.stderr


def test_medexp_sample_refuses_a_classifier(classifier_run, tmp_path):
    proc = medexp_main(
        "sample",
        f"ckpt_path={classifier_run / 'checkpoints' / 'best.ckpt'}",
        "output=x",
        "hydra.run.dir=log",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "a ClassificationTask checkpoint; expected a GAN's (model=gan)" in proc.stderr


def test_domain_fid_and_kid_tell_real_images_from_poor_samples(classifier_run):
    from medexp.data.phantoms import make_phantoms
    from medexp.metrics.domain import DomainFeatures, quality_metrics

    features = DomainFeatures.from_checkpoint(classifier_run / "checkpoints" / "best.ckpt", 0.0, 1.0)

    def phantoms(seed: int) -> torch.Tensor:
        images, _, _ = make_phantoms(64, 16, "binary", 2, np.random.default_rng(seed))
        return torch.from_numpy(images).float() / 255

    def measure(fake: torch.Tensor) -> tuple[float, float]:
        metrics = quality_metrics(features, kid_subset_size=32)
        for metric in metrics.values():
            metric.update(phantoms(0), real=True)
            metric.update(fake, real=False)
        return float(metrics["domain_fid"].compute()), float(metrics["domain_kid"].compute())

    same_kind = measure(phantoms(1))  # other phantoms: as real as the reference
    blurred = measure(torch.nn.functional.avg_pool2d(phantoms(1), 3, stride=1, padding=1))
    noise = measure(torch.rand(64, 1, 16, 16))
    assert same_kind[0] < blurred[0] < noise[0], (same_kind, blurred, noise)
    assert same_kind[1] < noise[1]
    # the classifier's weights are not part of a module that measures with them
    assert not list(features.parameters())


def test_a_gan_measured_with_a_classifier_selects_checkpoints_by_kid(classifier_run, tmp_path):
    feature_ckpt = classifier_run / "checkpoints" / "best.ckpt"
    metrics = train(
        compose_config(
            [
                *TINY,
                "model=gan",
                "model.latent_size=16",
                f"model.feature_ckpt={feature_ckpt}",
                "model.kid_subset_size=16",
                "model.monitor=val/domain_kid",
                "trainer.max_epochs=2",
            ],
            output_dir=tmp_path / "gan",
        )
    )
    assert metrics["monitor"] == "val/domain_kid"
    assert metrics["test"]["test/domain_fid"] > 0 and np.isfinite(metrics["test"]["test/domain_kid"])
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "metrics" in key], "the classifier is not stored in the GAN"

    # `medexp sample` measures too, against the split it is told
    medexp_main(
        "sample",
        f"ckpt_path={metrics['best_checkpoint']}",
        "n=32",
        "output=out",
        f"features_ckpt={feature_ckpt}",
        "kid_subset_size=16",
        "reference_split=val",
        "hydra.run.dir=log",
        cwd=tmp_path,
    )
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert quality["domain_fid"] > 0 and quality["reference"] == "val split (32 images)"

    # GAN-augmented training needs class-conditional samples
    unconditional = f"data.generated={{ckpt: {metrics['best_checkpoint']}, ratio: 1}}"
    with pytest.raises(MedexpError, match="an unconditional GAN; expected a class-conditional GAN"):
        train(compose_config([*TINY, unconditional, "trainer.max_epochs=1"], output_dir=tmp_path / "augmented"))

    with pytest.raises(MedexpError, match="model.kid_subset_size=64 but the split"):
        train(
            compose_config(
                [*TINY, "model=gan", f"model.feature_ckpt={feature_ckpt}", "model.kid_subset_size=64"],
                output_dir=tmp_path / "too_many",
            )
        )


def test_gan_augmented_classification_mixes_generated_images(gan_run, tmp_path):
    ckpt = gan_run / "checkpoints" / "last.ckpt"
    runs = {}
    for ratio in (0, 1):
        out = tmp_path / f"ratio{ratio}"
        generated = f"data.generated={{ckpt: {ckpt}, ratio: {ratio}, labels: balanced}}"
        runs[ratio] = train(compose_config([*TINY, generated, "trainer.max_epochs=1", "test=false"], output_dir=out))
        runs[ratio]["info"] = json.loads((out / "run_info.json").read_text())
    # as many generated images as real ones: twice the training batches, and other data
    assert runs[1]["info"]["data_fingerprint"] != runs[0]["info"]["data_fingerprint"]
    from medexp.data.synthetic import SyntheticDataModule

    datamodule = SyntheticDataModule(
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        image_size=16,
        num_samples={"train": 128, "val": 32, "test": 32},
        batch_size=16,
        intensity_range=[0.0, 1.0],
        generated={"ckpt": str(ckpt), "ratio": 1, "labels": "balanced"},
    )
    datamodule.setup()
    loader = datamodule.train_dataloader()
    assert len(loader.dataset) == 256
    generated = loader.dataset.datasets[1]
    assert generated.labels.bincount().tolist() == [64, 64]
    assert generated.images.shape == (128, 1, 16, 16)


@pytest.mark.parametrize(
    ("generated", "message"),
    [
        ("{ckpt: missing.ckpt, ratio: 0.5}", "data.generated.ckpt='missing.ckpt': no such file"),
        ("{ckpt: x, ratio: -1}", "data.generated.ratio=-1; expected a number >= 0"),
        ("{ckpt: x, ratio: 1, label: train}", "data.generated has unknown key(s) ['label']"),
    ],
)
def test_bad_generated_settings_are_refused(tmp_path, generated, message):
    with pytest.raises(MedexpError, match=re.escape(message)):
        train(compose_config([*TINY, f"data.generated={generated}"], output_dir=tmp_path))


def test_augmenting_with_a_gan_of_other_images_is_refused(gan_run, tmp_path):
    ckpt = gan_run / "checkpoints" / "last.ckpt"
    # the GAN made 16-pixel images; these data are 32 pixels
    cfg = compose_config(
        [
            *QUIET,
            "data.image_size=32",
            "data.num_samples={train: 32, val: 8, test: 8}",
            f"data.generated={{ckpt: {ckpt}, ratio: 1}}",
            "trainer.max_epochs=1",
        ],
        output_dir=tmp_path,
    )
    with pytest.raises(
        MedexpError, match=r"the GAN makes images of shape \(1, 16, 16\); the training images are \(1, 32, 32\)"
    ):
        train(cfg)


def test_a_discriminator_that_wins_outright_is_reported(tmp_path, caplog):
    # a generator that barely learns against a fast discriminator: the usual GAN failure
    d_optimizer = "model.d_optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 0.01}"
    with caplog.at_level("WARNING", logger="medexp"):
        metrics = train(
            compose_config(
                [
                    *TINY,
                    "model=gan",
                    "model.latent_size=16",
                    "optimizer.lr=1e-7",
                    d_optimizer,
                    "trainer.max_epochs=3",
                    "test=false",
                ],
                output_dir=tmp_path,
            )
        )
    assert metrics["fit"]["val/d_real"] > 0.95 and metrics["fit"]["val/d_fake"] < 0.05
    assert "the discriminator wins outright" in caplog.text and "model.d_optimizer" in caplog.text


def test_a_gan_trains_under_ddp(tmp_path):
    # two CPU processes (gloo); each batch steps both nets, so DDP must allow unused parameters
    run_cli(
        "train",
        "model=gan",
        "model.conditional=true",
        "model.latent_size=16",
        "trainer=ddp_sim",
        *TINY,
        "data.num_samples={train: 64, val: 16, test: 16}",
        "trainer.max_epochs=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["test/d_loss"])
    assert (
        "AdversarialTask under DDP: trainer.strategy=ddp_find_unused_parameters_true"
        in (tmp_path / "run" / "train.log").read_text()
    )


# ---------------------------------------------------------------------------------- adversarial losses
REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_adversarial_losses_match_a_hand_computation():
    # bce: -mean(log s(r)) - mean(log(1 - s(f))); log(1 - s(x)) = log s(-x)
    bce_d = -(_log_sigmoid(2.0) + _log_sigmoid(-1.0)) / 2 - (_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2
    assert discriminator_loss("bce", REAL, FAKE).item() == pytest.approx(bce_d, rel=1e-5)
    # one-sided label smoothing: real images' target 0.9
    smoothed = -sum(0.9 * _log_sigmoid(r) + 0.1 * _log_sigmoid(-r) for r in (2.0, -1.0)) / 2
    smoothed -= (_log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 2
    assert discriminator_loss("bce", REAL, FAKE, real_label=0.9).item() == pytest.approx(smoothed, rel=1e-5)
    # hinge: mean(relu(1 - r)) + mean(relu(1 + f)) = mean(0, 2) + mean(1.5, 0)
    assert discriminator_loss("hinge", REAL, FAKE).item() == pytest.approx(1.0 + 0.75)
    # Wasserstein: mean(f) - mean(r) = -1.25 - 0.5
    assert discriminator_loss("wgan_gp", REAL, FAKE).item() == pytest.approx(-1.75)
    # the generator: non-saturating -mean(log s(f)); hinge and Wasserstein -mean(f)
    assert generator_loss("bce", FAKE).item() == pytest.approx(-(_log_sigmoid(0.5) + _log_sigmoid(-3.0)) / 2)
    assert generator_loss("hinge", FAKE).item() == pytest.approx(1.25)
    assert generator_loss("wgan_gp", FAKE).item() == pytest.approx(1.25)
    with pytest.raises(
        MedexpError, match=r"model.adversarial_loss='lsgan'; expected one of \['bce', 'hinge', 'wgan_gp'\]"
    ):
        discriminator_loss("lsgan", REAL, FAKE)


@pytest.mark.parametrize(("scale", "expected"), [(3.0, 4.0), (1.0, 0.0), (0.5, 0.25)])
def test_the_gradient_penalty_of_a_linear_critic_is_its_norm_minus_one_squared(scale, expected):
    # critic(x) = <w, x>: its gradient is w everywhere, so the penalty is (|w| - 1)^2 wherever it is taken
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 2, 4, 4, generator=generator)
    weight = (scale * direction / direction.norm()).requires_grad_(True)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return (x * weight).flatten(1).sum(dim=1)

    real, fake = torch.rand(5, 2, 4, 4, generator=generator), torch.rand(5, 2, 4, 4, generator=generator)
    penalty = gradient_penalty(critic, real, fake)
    assert penalty.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # differentiable for the critic's step: d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    penalty.backward()
    expected_grad = 2 * (scale - 1) * weight.detach() / scale
    assert torch.allclose(weight.grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan_gp"])
def test_each_adversarial_loss_trains_a_gan(tmp_path, loss):
    n_critic = 2 if loss == "wgan_gp" else 1
    metrics = train(
        compose_config(
            [
                *QUIET,
                "model=gan",
                f"model.adversarial_loss={loss}",
                f"model.n_critic={n_critic}",
                "model.latent_size=16",
                "data.image_size=16",
                "data.num_samples={train: 32, val: 16, test: 16}",
                "data.batch_size=16",
                "trainer.log_every_n_steps=1",
                "trainer.max_epochs=1",
                "test=false",
            ],
            output_dir=tmp_path,
        )
    )
    assert all(np.isfinite(metrics["fit"][f"val/{name}"]) for name in ("loss", "d_loss", "d_real", "d_fake"))
    if loss == "bce":  # probabilities; the others log raw critic scores
        assert 0 < metrics["fit"]["val/d_real"] < 1
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    steps = [int(next(iter(state["state"].values()))["step"]) for state in checkpoint["optimizer_states"]]
    # 2 batches: the generator steps once per batch, the discriminator n_critic times
    assert steps == [2, 2 * n_critic]
    assert checkpoint["hyper_parameters"]["adversarial_loss"] == loss


def test_an_unknown_adversarial_loss_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(MedexpError, match=r"model.adversarial_loss='lsgan'; expected one of"):
        train(compose_config([*QUIET, "model=gan", "model.adversarial_loss=lsgan"], output_dir=tmp_path))
    with pytest.raises(MedexpError, match=r"model.n_critic=0; expected a positive integer"):
        train(compose_config([*QUIET, "model=gan", "model.n_critic=0"], output_dir=tmp_path))

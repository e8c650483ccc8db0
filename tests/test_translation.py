"""Image-to-image translation: the adversarial losses every GAN takes, synthetic translation
pairs (paired and unpaired), translation metrics, and pix2pix and CycleGAN trained end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medexp.data.translation import SyntheticTranslationDataModule
from medexp.metrics.translation import MS_SSIM_MIN_SIZE, translation_metrics
from medexp.tasks.adversarial import ImagePool
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, run_cli

TINY = [
    *QUIET,
    "data=synthetic_translation",
    "data.image_size=16",
    "data.num_samples={train: 64, val: 32, test: 32}",
    "data.batch_size=8",
    "trainer.log_every_n_steps=4",
]
# pix2pix settings where 6 epochs reliably beat the identity (a fast generator, a slow discriminator)
PIX2PIX = [
    "model=pix2pix",
    "optimizer.lr=1e-2",
    "model.d_optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 2e-4, betas: [0.5, 0.999]}",
]


def test_the_image_pool_serves_earlier_images_once_full():
    assert torch.equal(ImagePool(0).query(torch.ones(3, 1, 2, 2)), torch.ones(3, 1, 2, 2))
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: the new images themselves
    served = [pool.query(torch.full((4, 1, 1, 1), 10.0 + k)) for k in range(5)]
    values = torch.cat(served).flatten()
    assert (values < 10).any(), "a full pool hands back stored images"
    assert (values >= 10).any() and len(pool.images) == 4
    with pytest.raises(MedexpError, match="model.pool_size=-1"):
        ImagePool(-1)


# ---------------------------------------------------------------------------------- data
def _data(**options) -> SyntheticTranslationDataModule:
    settings = {"image_size": 16, "num_samples": {"train": 32, "val": 16, "test": 16}, "batch_size": 8, **options}
    datamodule = SyntheticTranslationDataModule(**settings)
    datamodule.setup()
    return datamodule


def test_the_two_modalities_map_tissues_differently():
    dataset = _data().datasets["val"]
    source, target, tissues = dataset.arrays["image"], dataset.arrays["target"], dataset.tissues
    assert source.shape == target.shape == tissues.shape == (16, 1, 16, 16) and source.dtype == np.float32
    mean = {
        name: (source[tissues == k].mean(), target[tissues == k].mean())
        for k, name in enumerate(["air", "lung", "soft"])
    }
    # lungs are darker than soft tissue in the source, brighter in the target
    assert mean["lung"][0] < mean["soft"][0] and mean["lung"][1] > mean["soft"][1]
    # within soft tissue the target's intensities fall where the source's rise
    soft = tissues == 2
    assert np.corrcoef(source[soft], target[soft])[0, 1] < -0.2
    # the target is the less noisy modality: smaller differences between neighbouring air pixels
    air = (tissues[..., 1:] == 0) & (tissues[..., :-1] == 0)
    assert np.abs(np.diff(target, axis=-1))[air].mean() < np.abs(np.diff(source, axis=-1))[air].mean()


def test_synthetic_pairs_are_deterministic_and_come_in_3d():
    first, again, other = _data(), _data(), _data(seed=1)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    volumes = _data(spatial_dims=3, num_samples={"train": 4, "val": 2, "test": 2})
    batch = next(iter(volumes.val_dataloader()))
    assert batch["image"].shape == batch["target"].shape == (2, 1, 16, 16, 16)
    assert batch["image"].dtype == batch["target"].dtype == torch.float32


def test_unpaired_training_draws_other_targets_every_epoch():
    paired, unpaired = _data(), _data(paired=False)
    loader = unpaired.train_dataloader()
    pairs = {epoch: (loader.sampler.set_epoch(epoch), list(loader.sampler))[1] for epoch in (0, 1)}
    sources = [s for s, _ in pairs[0]]
    targets = [t for _, t in pairs[0]]
    assert sorted(sources) == sorted(targets) == list(range(32)), "every source and every target once per epoch"
    assert sum(s == t for s, t in pairs[0]) < 8, "targets are not their sources' own"
    assert pairs[0] != pairs[1]
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == pairs[0], "reproducible: the same epoch draws the same pairs"
    # a batch holds each source with another sample's target
    data = paired.datasets["train"].arrays
    batch = next(iter(loader))
    rows = [s for s, _ in pairs[0][:8]]
    assert torch.equal(batch["image"], torch.from_numpy(data["image"][rows]))
    assert not torch.equal(batch["target"], torch.from_numpy(data["target"][rows]))
    assert torch.equal(batch["target"], torch.from_numpy(data["target"][[t for _, t in pairs[0][:8]]]))
    # validation keeps the true targets
    val = next(iter(unpaired.val_dataloader()))
    assert torch.equal(val["target"], torch.from_numpy(paired.datasets["val"].arrays["target"][:8]))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"truth": False}, "data.truth=false; synthetic pairs always have their true targets"),
        ({"out_channels": 2}, "synthetic pairs are grey"),
        ({"task": "binary"}, "data.task='binary'; translation data serve data.task=translation"),
        ({"paired": "yes"}, "data.paired='yes'; expected true or false"),
        ({"target_intensity_range": [1, 0]}, "data.target_intensity_range=[1.0, 0.0]; expected [low, high]"),
    ],
)
def test_bad_translation_data_settings_are_refused(option, message):
    with pytest.raises(MedexpError, match=re.escape(message)):
        SyntheticTranslationDataModule(image_size=16, **option)


# ---------------------------------------------------------------------------------- metrics
def test_translation_metrics_measure_translations_and_the_baseline():
    small = translation_metrics(1.0, 32, baseline=True)
    assert sorted(small) == ["mae", "mae_source", "psnr", "psnr_source", "ssim", "ssim_source"]
    # MS-SSIM needs a whole 11-pixel window after 4 halvings: 160 pixels
    assert "ms_ssim" in translation_metrics(1.0, MS_SSIM_MIN_SIZE)
    assert "ms_ssim" not in translation_metrics(1.0, MS_SSIM_MIN_SIZE - 1) and "ms_ssim" not in translation_metrics(1.0)
    target = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    small["mae"].update(target + 0.1, target)
    small["psnr"].update(target + 0.1, target)
    assert small["mae"].compute().item() == pytest.approx(0.1, abs=1e-5)
    assert small["psnr"].compute().item() == pytest.approx(20.0, abs=1e-3)  # 10 log10(1 / 0.01)


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pix2pix_run(tmp_path_factory):
    """pix2pix trained for 6 epochs through the command line, as a user runs it."""
    cwd = tmp_path_factory.mktemp("pix2pix")
    run_cli("train", *PIX2PIX, *TINY, "trainer.max_epochs=6", "report=false", "hydra.run.dir=run", cwd=cwd)
    return cwd / "run"


def test_pix2pix_beats_the_identity(pix2pix_run):
    metrics = json.loads((pix2pix_run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/mae"
    test = metrics["test"]
    # the source itself, unchanged, as the translation: what the generator must beat
    assert test["test/mae"] < 0.9 * test["test/mae_source"], test
    assert test["test/psnr"] > test["test/psnr_source"] and test["test/ssim"] > test["test/ssim_source"], test
    for name in ("loss", "d_loss", "d_real", "d_fake"):
        assert np.isfinite(test[f"test/{name}"])


def test_translation_checkpoints_are_not_sampled_or_exported(pix2pix_run, tmp_path):
    from medexp.export import export
    from medexp.sample import sample

    ckpt = pix2pix_run / "checkpoints" / "best.ckpt"
    with pytest.raises(MedexpError, match="a Pix2PixTask checkpoint; expected a GAN's"):
        sample(compose_config([f"ckpt_path={ckpt}", f"output={tmp_path / 'x'}"], "sample", output_dir=tmp_path))
    with pytest.raises(MedexpError, match=r"cannot export a Pix2PixTask yet: .* medexp predict ckpt_path="):
        export(compose_config([f"ckpt_path={ckpt}", f"output={tmp_path / 'y'}"], "export", output_dir=tmp_path))
    assert not (tmp_path / "y").exists()


def test_medexp_predict_writes_translated_images(pix2pix_run, tmp_path):
    from PIL import Image

    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint
    from medexp.predict import predict

    source = _data().datasets["test"].arrays["image"][0, 0]
    Image.fromarray((source * 255).round().astype(np.uint8)).save(tmp_path / "slice.png")
    ckpt = pix2pix_run / "checkpoints" / "best.ckpt"
    overrides = [f"ckpt_path={ckpt}", f"input={tmp_path / 'slice.png'}", f"output={tmp_path / 'out'}"]
    predict(compose_config(overrides, "predict", output_dir=tmp_path / "run"))
    written = np.asarray(Image.open(tmp_path / "out" / "slice.png")).astype(np.float32) / 255
    model = Checkpoint(ckpt).build_model(INFERENCE)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(Image.open(tmp_path / "slice.png"))).float()[None, None] / 255)
    # the translation, in the input's orientation, 8-bit
    assert np.abs(written - expected[0, 0].numpy()).max() <= 1 / 255 + 1e-6


def test_cyclegan_trains_on_unpaired_data_and_logs_its_metrics(tmp_path):
    metrics = train(
        compose_config(
            [*TINY, "model=cyclegan", "data.paired=false", "model.pool_size=8", "trainer.max_epochs=2"],
            output_dir=tmp_path,
        )
    )
    assert metrics["monitor"] == "val/mae"
    for name in ("loss", "d_loss", "d_real", "d_fake", "mae", "psnr", "ssim", "mae_source"):
        assert np.isfinite(metrics["test"][f"test/{name}"]), name
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    nets = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert {"net", "net_back", "discriminator", "discriminator_back"} <= nets
    # both generators share the generator optimiser, both discriminators the other
    from hydra.utils import instantiate

    task = instantiate(compose_config([*TINY, "model=cyclegan"]).model, _convert_="all")
    counts = [sum(len(group["params"]) for group in state["param_groups"]) for state in checkpoint["optimizer_states"]]
    expected = [
        len([*task.net.parameters(), *task.net_back.parameters()]),
        len([*task.discriminator.parameters(), *task.discriminator_back.parameters()]),
    ]
    assert counts == expected
    assert checkpoint["hyper_parameters"]["cycle_weight"] == 10.0


def test_pix2pix_trains_on_volumes(tmp_path):
    metrics = train(
        compose_config(
            [
                *TINY,
                "model=pix2pix",
                "model.adversarial_loss=wgan_gp",
                "data.spatial_dims=3",
                "data.num_samples={train: 4, val: 2, test: 2}",
                "data.batch_size=2",
                "trainer.max_epochs=1",
                "test=false",
            ],
            output_dir=tmp_path,
        )
    )
    assert np.isfinite(metrics["fit"]["val/mae"]) and np.isfinite(metrics["fit"]["val/d_loss"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=pix2pix", "data.paired=false"], "model=pix2pix learns from aligned pairs, but data.paired=false"),
        (["model=cyclegan", "data.out_channels=2", "model.identity_weight=5"], "model.identity_weight=5"),
        (["model=cyclegan", "data.truth=false"], "model.monitor=val/mae compares translations with true targets"),
    ],
)
def test_settings_that_do_not_fit_translation_are_refused_early(tmp_path, overrides, message):
    cfg = compose_config([*TINY, *overrides], output_dir=tmp_path)
    with pytest.raises(MedexpError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_translation_model_on_other_data_names_the_fitting_models(tmp_path):
    with pytest.raises(MedexpError, match=re.escape("trains on data.task in ['translation'], but data.task='binary'")):
        train(compose_config([*QUIET, "model=pix2pix"], output_dir=tmp_path))


def test_cyclegan_identity_loss_follows_the_channels():
    from hydra.utils import instantiate

    cfg = compose_config(["model=cyclegan", "data=synthetic_translation"])
    assert instantiate(cfg.model, _convert_="all").identity_weight == 5.0  # half the cycle weight
    cfg = compose_config(["model=cyclegan", "data=synthetic_translation", "data.out_channels=2"])
    task = instantiate(cfg.model, _convert_="all")
    assert task.identity_weight == 0.0 and not task.baseline  # other channels: no identity, no baseline
    translated = task(torch.rand(2, 1, 16, 16))
    assert translated.shape == (2, 2, 16, 16) and task.back(translated).shape == (2, 1, 16, 16)
    assert translated.min() >= 0.0 and translated.max() <= 1.0  # the target range


def test_translations_are_measured_on_a_classifiers_features(tmp_path):
    # a classifier of the same kind of images (grey phantoms in [0, 1]) measures the translations
    classifier = train(
        compose_config(
            [*QUIET, "data.image_size=16", "data.num_samples={train: 32, val: 16, test: 16}", "trainer.max_epochs=1"]
            + ["test=false"],
            output_dir=tmp_path / "classifier",
        )
    )
    metrics = train(
        compose_config(
            [
                *TINY,
                *PIX2PIX,
                f"model.feature_ckpt={classifier['best_checkpoint']}",
                "model.kid_subset_size=16",
                "trainer.max_epochs=1",
            ],
            output_dir=tmp_path / "pix2pix",
        )
    )
    assert metrics["test"]["test/domain_fid"] > 0 and np.isfinite(metrics["test"]["test/domain_kid"])
    assert np.isfinite(metrics["test"]["test/mae"])

"""Diffusion models end to end: training with noise and v prediction, DDIM and DDPM sampling,
class-conditional guidance, EMA weights in checkpoints and samples, `medexp sample`, domain
FID/KID, and generated-data augmentation from a diffusion model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli

TINY = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 64, val: 16, test: 16}",
    "data.batch_size=16",
    "trainer.log_every_n_steps=2",
]
# a 2-level U-Net and a 100-step schedule: seconds on a CPU
DDPM = [
    "model=ddpm",
    "model.net.channels=[16,32]",
    "model.net.attention_levels=[false,true]",
    "model.net.norm_num_groups=8",
    "model.net.num_head_channels=8",
    "model.noise_scheduler.num_train_timesteps=100",
    "model.sample_steps=5",
    "model.val_sample_steps=2",
    "optimizer.lr=2e-3",
]


def build_task(tmp_path, *overrides: str):
    """A diffusion task built from the composed config, untrained."""
    from medexp.utils.config import build

    return build(compose_config([*TINY, *DDPM, *overrides], output_dir=tmp_path).model)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A class-conditional v-prediction diffusion model with EMA weights, trained for 2 epochs
    through the command line."""
    cwd = tmp_path_factory.mktemp("ddpm")
    run_cli(
        "train",
        *DDPM,
        "model.conditional=true",
        "model.prediction_type=v_prediction",
        "callbacks.ema.decay=0.9",
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.sample_grids.num_samples=8",
        "hydra.run.dir=run",
        cwd=cwd,
    )
    return cwd / "run"


def load_generator(run):
    from medexp.checkpoints.checkpoint import Checkpoint

    return Checkpoint(run / "checkpoints" / "last.ckpt").build_generator()


def test_a_diffusion_model_trains_and_draws_sample_grids(ddpm_run):
    metrics = json.loads((ddpm_run / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["test/loss"]) and metrics["test"]["test/loss"] > 0
    grids = sorted(p.name for p in (ddpm_run / "samples").glob("epoch_*.png"))
    assert grids == ["epoch_000.png", "epoch_001.png"]
    assert "model=ddpm without callbacks.ema.decay" not in (ddpm_run / "train.log").read_text()


def test_checkpoints_hold_the_ema_weights_and_samples_use_them(ddpm_run):
    checkpoint = torch.load(ddpm_run / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    differing = [key for key in averaged if key.startswith("net.") and not torch.equal(averaged[key], raw[key])]
    assert differing, "the checkpoint's weights are the EMA's, not the raw ones"
    model = load_generator(ddpm_run)
    assert all(torch.equal(model.state_dict()[key], averaged[key]) for key in differing)
    labels = torch.tensor([0, 1, 0, 1])
    ema_images, _ = model.sample(4, labels, torch.Generator().manual_seed(0))
    model.load_state_dict({key: value for key, value in raw.items() if key in model.state_dict()})
    raw_images, _ = model.sample(4, labels, torch.Generator().manual_seed(0))
    assert not torch.equal(ema_images, raw_images)


def test_medexp_sample_writes_reproducible_samples_in_the_intensity_range(ddpm_run, tmp_path):
    ckpt = ddpm_run / "checkpoints" / "last.ckpt"
    medexp_main("sample", f"ckpt_path={ckpt}", "n=8", "output=out", "seed=3", "hydra.run.dir=log", cwd=tmp_path)
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (8, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0  # the synthetic data's range
    assert labels.tolist() == [0] * 4 + [1] * 4
    assert (tmp_path / "out" / "samples.png").is_file()
    # the same seed, the same images (in process: a command's start-up costs seconds)
    from medexp.sample import sample

    def sample_again(*overrides: str) -> np.ndarray:
        overrides = [f"ckpt_path={ckpt}", "n=8", f"output={tmp_path / 'again'}", *overrides]
        sample(compose_config(overrides, "sample", output_dir=tmp_path / "log"))
        with np.load(tmp_path / "again" / "samples.npz") as npz:
            return npz["images"]

    assert np.array_equal(sample_again("seed=3"), images)
    assert not np.array_equal(sample_again("seed=4"), images)
    with pytest.raises(MedexpError, match=re.escape("label=2; this diffusion model generates classes 0..1")):
        sample_again("label=2")
    # sampling settings other than the trained ones
    ddpm = sample_again("seed=3", "sampler=ddpm", "guidance_scale=2")
    assert ddpm.shape == images.shape and not np.array_equal(ddpm, images)
    assert ddpm.min() >= 0.0 and ddpm.max() <= 1.0
    assert not np.array_equal(sample_again("seed=3", "sample_steps=2"), images)
    with pytest.raises(MedexpError, match=re.escape("sampler='euler'")):
        sample_again("sampler=euler")


def test_ddim_takes_its_steps_and_ddpm_every_training_step(ddpm_run):
    model = load_generator(ddpm_run)
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    labels = model.class_labels(torch.tensor([0, 1]), 2, model.device)
    with torch.no_grad():
        ddim = model.generate(labels, torch.Generator().manual_seed(1), sampler="ddim", steps=5)
        assert len(calls) == 5
        ddpm = model.generate(labels, torch.Generator().manual_seed(1), sampler="ddpm")
        assert len(calls) == 5 + 100
        again = model.generate(labels, torch.Generator().manual_seed(1), sampler="ddpm")
    assert ddim.shape == ddpm.shape == (2, 1, 16, 16)
    assert torch.isfinite(ddpm).all() and torch.equal(ddpm, again)  # DDPM's per-step noise is seeded too
    assert not torch.allclose(ddim, ddpm)


def test_guidance_sharpens_conditional_samples_of_the_asked_classes(ddpm_run):
    model = load_generator(ddpm_run)
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    plain, returned = model.sample(6, labels, torch.Generator().manual_seed(0))
    assert torch.equal(returned, labels) and plain.shape == (6, 1, 16, 16)
    model.hparams.guidance_scale = 3.0
    calls = []
    model.net.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    guided, _ = model.sample(6, labels, torch.Generator().manual_seed(0))
    assert set(calls) == {12}, "one pass over the classes and the null class together"
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    assert guided.min() >= 0 and guided.max() <= 1
    # without labels a conditional model cycles through its classes
    _, cycled = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert cycled.tolist() == [0, 1, 0]


def test_label_dropout_trains_the_null_class(tmp_path):
    model = build_task(tmp_path, "model.conditional=true", "model.cond_drop_prob=0.5")
    labels = torch.ones(400, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.class_labels(labels, 400, torch.device("cpu"), drop=True)
    assert set(dropped.tolist()) == {1, 2}  # the null class is num_classes (2)
    assert 150 < int((dropped == 2).sum()) < 250
    assert torch.equal(model.class_labels(labels, 400, torch.device("cpu")), labels)
    unconditional = build_task(tmp_path, "model.conditional=false")
    assert unconditional.class_labels(None, 3, torch.device("cpu")).tolist() == [2, 2, 2]


def test_the_v_prediction_target_is_the_schedulers_velocity(tmp_path):
    model = build_task(tmp_path, "model.prediction_type=v_prediction")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(3, 1, 16, 16, generator=generator)
    t = torch.tensor([0, 40, 99])
    alpha = model.noise_scheduler.alphas_cumprod[t].reshape(3, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(model.target(x0, noise, t), velocity)
    # from the true velocity at t, the DDIM step recovers the clean image
    noisy = model.noise_scheduler.add_noise(x0, noise, t)
    model.ddim_scheduler.set_timesteps(5)
    _, predicted = model.ddim_scheduler.step(velocity[1:2], 40, noisy[1:2])
    torch.testing.assert_close(predicted, x0[1:2], atol=1e-5, rtol=1e-5)
    epsilon = build_task(tmp_path, "model.prediction_type=epsilon")
    assert torch.equal(epsilon.target(x0, noise, t), noise)
    # images are scaled to [-1, 1] for the diffusion and back
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(epsilon.to_data_range(epsilon.to_model_range(images)), images)
    assert epsilon.to_model_range(torch.tensor([0.0, 1.0])).tolist() == [-1.0, 1.0]


def test_noise_prediction_trains_with_a_deterministic_validation_loss(tmp_path, caplog):
    with caplog.at_level("INFO", logger="medexp"):
        metrics = train(
            compose_config([*TINY, *DDPM, "trainer.max_epochs=1", "test=false"], output_dir=tmp_path / "run")
        )
    assert np.isfinite(metrics["fit"]["val/loss"])
    assert "model=ddpm without callbacks.ema.decay" in caplog.text
    model = build_task(tmp_path)
    batch = {"image": torch.rand(4, 1, 16, 16), "label": torch.tensor([0, 1, 0, 1])}
    losses = []
    for _ in range(2):
        model.on_validation_epoch_start()  # reseeds the noise and timesteps of evaluation
        losses.append(model._shared_step(batch, "val"))
    assert torch.equal(*losses)


def test_a_3d_diffusion_model_samples_volumes(tmp_path):
    model = build_task(tmp_path, "data.spatial_dims=3", "data.image_size=8")
    images, labels = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8, 8) and labels is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.prediction_type=x0", "model.prediction_type='x0'; expected one of ['epsilon', 'v_prediction']"),
        ("model.sampler=euler", "model.sampler='euler'; expected one of ['ddim', 'ddpm']"),
        ("model.guidance_scale=3", "model.guidance_scale=3: classifier-free guidance needs model.conditional=true"),
        ("model.sample_steps=500", "model.sample_steps=500; expected a whole number of DDIM steps in 1..100"),
        ("data.image_size=17", "data.image_size=17; the net (model.net.channels=[16, 32]) halves the images 1x"),
    ],
)
def test_bad_diffusion_options_are_refused_in_one_line(tmp_path, override, message):
    with pytest.raises(MedexpError, match=re.escape(message)) as raised:
        train(compose_config([*TINY, *DDPM, override], output_dir=tmp_path))
    assert str(raised.value).count("\n") == 1  # "1 problem(s) in the config:" and the problem


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """A classifier on the same data: its features measure the diffusion model's samples."""
    out = tmp_path_factory.mktemp("classifier")
    train(
        compose_config(
            [*TINY, "data.num_samples={train: 128, val: 16, test: 16}", "trainer.max_epochs=2", "test=false"],
            output_dir=out,
        )
    )
    return out / "checkpoints" / "best.ckpt"


def test_domain_fid_and_kid_of_diffusion_samples(classifier_ckpt, tmp_path):
    metrics = train(
        compose_config(
            [
                *TINY,
                *DDPM,
                f"model.feature_ckpt={classifier_ckpt}",
                "model.kid_subset_size=8",
                "model.monitor=val/domain_kid",
                "trainer.max_epochs=1",
            ],
            output_dir=tmp_path,
        )
    )
    assert metrics["monitor"] == "val/domain_kid"
    assert metrics["test"]["test/domain_fid"] > 0 and np.isfinite(metrics["test"]["test/domain_kid"])


def test_a_conditional_diffusion_model_augments_a_classifier(ddpm_run, tmp_path, caplog):
    ckpt = ddpm_run / "checkpoints" / "last.ckpt"
    generated = f"data.generated={{ckpt: {ckpt}, ratio: 1, labels: balanced}}"
    with caplog.at_level("INFO", logger="medexp"):
        metrics = train(compose_config([*TINY, generated, "trainer.max_epochs=1", "test=false"], output_dir=tmp_path))
    assert np.isfinite(metrics["fit"]["val/loss"])
    assert "generated-data augmentation: 64 images from a diffusion model (balanced classes" in caplog.text

"""Reconstruction models: denoising, a VAE's KL term, anomaly detection, and the config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medexp.tasks.reconstruction import corrupt
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main

TINY = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 128, val: 32, test: 32}",
    "data.batch_size=16",
    "trainer.log_every_n_steps=4",
]


def test_a_denoiser_beats_its_noisy_input(tmp_path):
    # the phantoms carry noise of their own (std 0.05), so the added noise must be stronger
    metrics = train(
        compose_config(
            [*TINY, "model=denoising_unet", "model.noise_std=0.2", "optimizer.lr=3e-3", "trainer.max_epochs=8"],
            output_dir=tmp_path,
        )
    )
    test = metrics["test"]
    assert test["test/psnr"] > test["test/psnr_input"] + 2.0  # dB
    assert {"test/ssim", "test/mse", "val/psnr"} <= {*test, *metrics["fit"]}


def test_a_vae_trains_and_logs_its_kl_term(tmp_path):
    # through the command line, as a user runs it
    medexp_main("train", "model=vae", *TINY, "trainer.max_epochs=2", "hydra.run.dir=run", cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["test/kl"] > 0
    assert torch.isfinite(torch.tensor(metrics["test"]["test/psnr"]))
    assert "test/psnr_input" not in metrics["test"]  # no noise, nothing to compare with

    # predict writes class probabilities and masks, not images: refused with the way to evaluate
    from PIL import Image

    from medexp.predict import predict

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "scan.png")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    cfg = compose_config(
        [f"ckpt_path={ckpt}", f"input={tmp_path / 'scan.png'}", f"output={tmp_path / 'out'}"],
        "predict",
        output_dir=tmp_path / "predict",
    )
    with pytest.raises(MedexpError, match="does not write reconstructions yet"):
        predict(cfg)


def test_anomaly_detection_finds_lesions(tmp_path):
    # trained on lesion-free images (class 0) only: lesions reconstruct badly and score high
    metrics = train(
        compose_config(
            [
                *TINY,
                "model=autoencoder",
                "model.normal_classes=[0]",
                "data.lesion_contrast=3",
                "optimizer.lr=3e-3",
                "trainer.max_epochs=6",
            ],
            output_dir=tmp_path,
        )
    )
    assert metrics["test"]["test/anomaly_auroc"] > 0.7


def test_eval_noise_is_the_same_every_epoch():
    image = torch.rand(2, 1, 8, 8)
    draws = [corrupt(image, "gaussian", 0.1, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*draws)
    assert (corrupt(image, "poisson", 0.1) >= 0).all()
    # blur: deterministic, smooths an edge, and leaves a flat image flat up to its borders
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0
    blurred = corrupt(step, "blur", 1.5)
    assert torch.equal(blurred, corrupt(step, "blur", 1.5))
    assert 0.05 < blurred[0, 0, 8, 7] < 0.5 < blurred[0, 0, 8, 8] < 0.95
    assert torch.allclose(corrupt(torch.ones(1, 1, 16, 16), "blur", 1.5), torch.ones(1, 1, 16, 16), atol=1e-3)
    with pytest.raises(MedexpError, match="expected one of"):
        corrupt(image, "salt", 0.1)


def test_a_reconstruction_model_is_refused_on_segmentation_data(tmp_path):
    cfg = compose_config([*QUIET, "model=autoencoder", "data=synthetic_seg"], output_dir=tmp_path)
    with pytest.raises(MedexpError) as error:
        train(cfg)
    assert "trains on data.task in ['binary', 'multiclass', 'multilabel']" in str(error.value)
    assert "models for segmentation data: model=attention_unet,basic_unet,segresnet,swin_unetr,unet,unetr" in str(
        error.value
    )


def test_psnr_uses_the_data_value_range(compose_cfg):
    # MedMNIST is normalised to [-1, 1]: PSNR/SSIM over a range of 2, without the user saying so
    assert compose_cfg("model=autoencoder", "data=medmnist").model.data_range == 2.0
    assert compose_cfg("model=autoencoder").model.data_range == 1.0

"""``privacy=dp``: DP-SGD with Opacus through ``medexp train``, and what it refuses up front."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from medexp.checkpoints.checkpoint import load_checkpoint
from medexp.eval import evaluate
from medexp.privacy.dp import DifferentialPrivacy
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config

# a generous budget (epsilon 50 at delta 1e-5) on easy phantoms; RDP: the fastest accountant
TARGET_EPSILON = 50.0
DP = [
    *QUIET,
    "privacy=dp",
    "privacy.accountant=rdp",
    f"privacy.target_epsilon={TARGET_EPSILON}",
    "privacy.noise_seed=0",
    "data.image_size=16",
    "data.lesion_contrast=3",
    "data.num_samples={train: 256, val: 64, test: 64}",
    "data.batch_size=16",
    "optimizer.lr=0.01",
    "trainer.max_epochs=3",
    "report=false",
]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dp")
    return run, train(compose_config(DP, output_dir=run))


def test_dp_training_spends_the_budget_and_learns(dp_run):
    run, metrics = dp_run
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        epsilons = [float(row["train/epsilon"]) for row in csv.DictReader(file) if row.get("train/epsilon")]
    # logged every epoch, growing, and the noise was chosen to end at the target
    assert len(epsilons) == 3 and all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert 0.9 * TARGET_EPSILON < epsilons[-1] <= TARGET_EPSILON * 1.001
    assert metrics["fit"]["train/epsilon"] == pytest.approx(epsilons[-1])
    assert metrics["test"]["test/auroc"] > 0.75, metrics["test"]


def test_the_dp_checkpoint_holds_groupnorm_and_the_accountant(dp_run, tmp_path):
    run, metrics = dp_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    # SimpleCNN's BatchNorms became GroupNorms (no running statistics: they would leak batch peers)
    assert not any("running_mean" in key for key in checkpoint["state_dict"])
    history = checkpoint["callbacks"]["DifferentialPrivacy"]["accountant"]["history"]
    noise, sample_rate, steps = history[0]
    assert sample_rate == pytest.approx(16 / 256) and steps == 3 * 16 and noise > 0
    # eval rebuilds the same layers from the stored config and reproduces the recorded metrics
    results = evaluate(
        compose_config([f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", *QUIET[2:]], "eval", output_dir=tmp_path)
    )
    assert results["test"]["test/auroc"] == pytest.approx(metrics["test"]["test/auroc"], abs=1e-6)


def test_what_opacus_cannot_do_is_refused_before_anything_is_built(tmp_path):
    cfg = compose_config(
        [
            *DP,
            "trainer=ddp_sim",
            "+trainer.accumulate_grad_batches=2",
            "+trainer.gradient_clip_val=1.0",
            "trainer.precision=16-mixed",
            "privacy.noise_multiplier=1.0",
            "privacy.delta=2",
            "model.sam_rho=0.05",
        ],
        output_dir=tmp_path,
    )
    with pytest.raises(MedexpError) as error:
        train(cfg)
    message = str(error.value)
    assert "7 problem(s)" in message
    for expected in (
        "privacy.delta=2; expected a number in (0, 1)",
        "privacy.target_epsilon=50.0 and privacy.noise_multiplier=1.0: set exactly one",
        "trainer.devices=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=1.0",
        "trainer.precision=16-mixed",
        "model.sam_rho=0.05: SAM's second pass reads each batch again",
    ):
        assert expected in message


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("model=gan", "AdversarialTask optimises its own way"),
        ("model=denoising_unet", r"trains parameters outside its net \(residual_scale\)"),
    ],
)
def test_models_opacus_cannot_train_are_named(tmp_path, model, expected):
    with pytest.raises(MedexpError, match=expected):
        train(compose_config([*DP, model], output_dir=tmp_path))


def test_an_empty_poisson_batch_still_steps_but_a_diverged_loss_is_kept():
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    task = torch.nn.Module()
    for size, kept in ((0, False), (2, True)):
        loss = torch.full((), math.nan, requires_grad=True) * 1.0
        dp.on_train_batch_start(None, task, {"image": torch.zeros(size, 1, 8, 8)}, 0)
        dp.on_before_backward(None, task, loss)
        # an empty batch's NaN mean is zeroed for the fault check; a real NaN reaches it
        assert math.isnan(loss.item()) == kept

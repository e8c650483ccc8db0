"""Federated simulation: site splits, FedAvg averaging, FedProx's term, and `medexp federate` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from medexp.data.synthetic import SyntheticDataModule
from medexp.federate import federate
from medexp.federated.aggregate import federated_average
from medexp.federated.local import FedProx
from medexp.federated.sites import label_counts, plan_sites
from medexp.utils.errors import MedexpError
from tests.conftest import compose_config, run_cli

# 3 sites with a Dirichlet label skew: 6 rounds of one local epoch learn the (slightly easier)
# phantoms well above chance in a few seconds of one CPU thread
SMALL = [
    "data.num_samples={train: 600, val: 90, test: 300}",
    "data.batch_size=16",
    "data.lesion_contrast=1.5",
    "optimizer.lr=2e-3",
]
RUN = [
    *SMALL,
    "federated.sites=3",
    "federated.rounds=6",
    "federated.split=dirichlet",
    "federated.alpha=3",
    "federated.algorithm=fedprox",
    "federated.mu=0.01",
]


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    data = SyntheticDataModule(
        task="multiclass",
        num_classes=3,
        in_channels=1,
        spatial_dims=2,
        image_size=16,
        num_samples={"train": 300, "val": 150, "test": 150},
        scan="off",
    )
    data.setup()
    return data


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    """`medexp federate` as a user runs it: 3 sites, FedProx, non-IID."""
    cwd = tmp_path_factory.mktemp("federate")
    run_cli("federate", "hydra.run.dir=run", *RUN, cwd=cwd)
    return cwd / "run"


# --- sites ---


def _labels(data: SyntheticDataModule, split: str) -> np.ndarray:
    return data.datasets[split].labels.numpy()


def test_every_sample_is_at_exactly_one_site(datamodule):
    plan = plan_sites(datamodule, 4, "dirichlet", alpha=0.5, seed=3)
    assert plan.names == ["site_0", "site_1", "site_2", "site_3"]
    for split in ("train", "val", "test"):
        rows = np.concatenate(plan.indices[split])
        assert sorted(rows.tolist()) == list(range(len(datamodule.datasets[split]))), split


def test_iid_sites_get_every_class_alike(datamodule):
    plan = plan_sites(datamodule, 3, "iid", seed=0)
    labels = _labels(datamodule, "train")
    per_class = np.bincount(labels, minlength=3)
    for rows in plan.indices["train"]:
        counts = np.bincount(labels[rows], minlength=3)
        # a third of each class, up to rounding
        assert np.all(np.abs(counts - per_class / 3) <= 1), counts


def test_dirichlet_skews_the_classes_the_same_way_in_every_split(datamodule):
    plan = plan_sites(datamodule, 3, "dirichlet", alpha=0.3, seed=1)
    # the same seed gives the same sites; another seed other sites
    again = plan_sites(datamodule, 3, "dirichlet", alpha=0.3, seed=1)
    other = plan_sites(datamodule, 3, "dirichlet", alpha=0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan.indices["train"], again.indices["train"]))
    assert not all(np.array_equal(a, b) for a, b in zip(plan.indices["train"], other.indices["train"]))
    shares = {}
    for split in ("train", "test"):
        labels = _labels(datamodule, split)
        # each class's share held by each site, (classes, sites)
        shares[split] = (
            np.stack([np.bincount(labels[rows], minlength=3) for rows in plan.indices[split]], axis=1)
            / np.bincount(labels, minlength=3)[:, None]
        )
    # non-IID: some site holds far more than a third of some class, far less of another
    assert shares["train"].max() > 0.6 and shares["train"].min() < 0.15
    # the test split follows the training split's shares (up to rounding of 50 samples per class)
    assert np.abs(shares["train"] - shares["test"]).max() < 0.05
    counts = label_counts(datamodule, plan)
    assert sum(counts["site_0"]["train"].values()) == len(plan.indices["train"][0])


def test_a_site_without_training_samples_is_refused(datamodule):
    with pytest.raises(
        MedexpError, match=r"federated.split=dirichlet: site\(s\) .* get no training samples.*federated.alpha"
    ):
        plan_sites(datamodule, 40, "dirichlet", alpha=0.01, seed=0)


def test_sites_from_the_data_and_a_clear_refusal_without_them(datamodule):
    with pytest.raises(MedexpError, match="federated.split=column needs the site of every sample.*dirichlet or iid"):
        plan_sites(datamodule, None, "column")
    # data that carry a site per sample (as `sites` of each split's dataset)
    for split in ("train", "val", "test"):
        n = len(datamodule.datasets[split])
        datamodule.datasets[split].sites = np.array(["north", "south"])[np.arange(n) % 2]
    try:
        plan = plan_sites(datamodule, None, "column")
        assert plan.names == ["north", "south"]
        assert plan.counts("train") == [150, 150] and plan.indices["val"][1].tolist() == list(range(1, 150, 2))
        with pytest.raises(MedexpError, match=r"federated.sites=3 but .* 2 site\(s\) \['north', 'south'\]"):
            plan_sites(datamodule, 3, "column")
    finally:
        for split in ("train", "val", "test"):
            del datamodule.datasets[split].sites


# --- the server's average and FedProx ---


def test_federated_average_weights_sites_by_samples_and_counts_batches():
    torch.manual_seed(0)
    start = nn.BatchNorm1d(3)
    sites = []
    for batches in (2, 5):
        site = nn.BatchNorm1d(3)
        site.load_state_dict(start.state_dict())
        for _ in range(batches):
            site(torch.randn(8, 3) * 2 + 1)
        with torch.no_grad():
            site.weight.add_(torch.randn(3))
        sites.append(site.state_dict())
    averaged = federated_average(start.state_dict(), sites, weights=[100, 300])
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected = 0.25 * sites[0][name] + 0.75 * sites[1][name]
        torch.testing.assert_close(averaged[name], expected)
    # every batch any site saw, counted once
    assert int(averaged["num_batches_tracked"]) == 7
    with pytest.raises(ValueError, match="positive"):
        federated_average(start.state_dict(), sites, weights=[0, 300])


def test_fedprox_adds_the_gradient_of_its_proximal_term():
    torch.manual_seed(0)
    net, mu = nn.Linear(4, 2), 0.5
    prox = FedProx(mu)
    prox.on_train_start(None, net)  # the global weights
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # local steps moved them
    x = torch.randn(6, 4)
    # the gradient of loss + mu/2 ||w - w_global||^2, by autograd
    penalised = net(x).square().mean() + mu / 2 * sum(
        (p - prox.anchor[n]).square().sum() for n, p in net.named_parameters()
    )
    expected = torch.autograd.grad(penalised, list(net.parameters()))
    net(x).square().mean().backward()
    prox.on_before_optimizer_step(None, net, torch.optim.SGD(net.parameters(), lr=0.1))
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert float(prox.penalty(net)) > 0


# --- config checks ---


def test_bad_federated_settings_are_reported_together(tmp_path):
    cfg = compose_config(
        [
            "federated.algorithm=fedsgd",
            "federated.rounds=0",
            "federated.alpha=0",
            "trainer.devices=2",
            "scheduler=plateau",
            "federated.sites=null",
        ],
        "federate",
        output_dir=tmp_path,
    )
    with pytest.raises(MedexpError) as error:
        federate(cfg)
    message = str(error.value)
    for expected in (
        "federated.algorithm='fedsgd'; expected one of ['fedavg', 'fedprox']",
        "federated.rounds=0",
        "federated.alpha=0",
        "trainer.devices=2",
        "scheduler=plateau",
        "federated.sites=null",
    ):
        assert expected in message
    assert not (tmp_path / "checkpoints").exists()  # nothing was built


# --- `medexp federate` end to end ---


def test_federated_run_learns_and_reports_every_site(federated_run):
    metrics = json.loads((federated_run / "metrics.json").read_text())
    assert metrics["federated"]["site_names"] == ["site_0", "site_1", "site_2"]
    # chance is 0.5: the global model learned from sites that never pooled their data
    assert metrics["test"]["test/auroc"] > 0.85
    samples = 0
    for site in metrics["sites"].values():
        assert site["test"]["test/auroc"] > 0.7 and "val/auroc" in site["val"]
        samples += site["samples"]["test"]
        assert sum(site["labels"]["train"].values()) == site["samples"]["train"]
    assert samples == 300
    # non-IID: the sites' class mixes differ
    positives = [s["labels"]["train"].get("1", 0) / s["samples"]["train"] for s in metrics["sites"].values()]
    assert max(positives) - min(positives) > 0.1

    with (federated_run / "federated.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["round"], r["site"]) for r in rows[:4]] == [
        ("1", "site_0"),
        ("1", "site_1"),
        ("1", "site_2"),
        ("1", "global"),
    ]
    assert len(rows) == 6 * 4
    assert sum(int(r["train_samples"]) for r in rows[:3]) == int(rows[3]["train_samples"]) == 600
    assert all(float(r["train/prox"]) > 0 for r in rows if r["site"] != "global")  # FedProx was on
    # the last round's global validation is the final model's
    assert float(rows[-1]["val/auroc"]) == pytest.approx(metrics["val"]["val/auroc"], abs=1e-6)


def test_the_global_checkpoint_is_evaluated_by_medexp_eval(federated_run, tmp_path):
    from medexp.eval import evaluate

    metrics = json.loads((federated_run / "metrics.json").read_text())
    results = evaluate(
        compose_config([f"ckpt_path={federated_run / 'checkpoints' / 'global.ckpt'}"], "eval", output_dir=tmp_path)
    )
    for name, value in metrics["test"].items():
        assert results["test"][name] == pytest.approx(value, abs=1e-6), name
    assert results["recorded"]["test"] == metrics["test"]  # eval found the federated run's metrics

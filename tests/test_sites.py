"""Acquisition sites: synthetic domain shift, site columns of manifests, per-site metrics and
reports, leave-one-site-out folds, and test-time BatchNorm adaptation."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from medexp.callbacks.adaptation import BatchNormAdaptation
from medexp.data.files import FileDataModule
from medexp.train import train
from medexp.utils.config import build, check_config
from medexp.utils.errors import MedexpError
from medexp.utils.validation import validate_config
from tests.conftest import QUIET, compose_config
from tests.test_files import write_csv, write_png

SHIFT = "data.sites={a: {}, b: {contrast: 0.5, brightness: 0.25}}"
TINY = ["data.image_size=16", "data.num_samples={train: 24, val: 12, test: 32}", "data.batch_size=16"]


def test_synthetic_sites_shift_the_images_and_batches_carry_the_site(compose_cfg):
    plain = build(compose_cfg(*TINY).data)
    sited = build(compose_cfg(*TINY, SHIFT).data)
    plain.setup()
    sited.setup()
    assert sited.site_names == ["a", "b"] and plain.site_names is None
    test = sited.datasets["test"]
    np.testing.assert_array_equal(test.sites, np.arange(32) % 2)  # dealt in turn: an equal share each
    a, b = test.sites == 0, test.sites == 1
    # site a is the phantoms as generated (the shift draws from a stream of its own), site b is
    # them at half the contrast, 0.25 brighter: x' = 0.5 x + 0.5 of intensities in [0, 1]
    np.testing.assert_array_equal(test.images[a], plain.datasets["test"].images[a])
    expected = np.round((0.5 * plain.datasets["test"].images[b] / 255 + 0.5) * 255)
    assert np.abs(test.images[b].astype(float) - expected).max() <= 1
    np.testing.assert_array_equal(test.labels, plain.datasets["test"].labels)
    batch = next(iter(sited.test_dataloader()))
    assert batch["site"].tolist() == [0, 1] * 8 and batch["site"].dtype == torch.int64
    assert "site" not in next(iter(plain.test_dataloader()))


def test_train_sites_train_on_some_sites_and_test_on_all(compose_cfg):
    datamodule = build(
        compose_cfg(*TINY, "data.sites={a: {}, b: {noise: 0.1}, c: {gamma: 2}}", "data.train_sites=[c]").data
    )
    datamodule.setup()
    assert set(datamodule.datasets["train"].sites) == {2} and set(datamodule.datasets["val"].sites) == {2}
    assert len(datamodule.datasets["train"]) == 24  # the split keeps its size, all from site c
    assert sorted(set(datamodule.datasets["test"].sites)) == [0, 1, 2]


def test_leave_one_site_out_folds(compose_cfg, tmp_path):
    sites = "data.sites={a: {}, b: {noise: 0.1}, c: {gamma: 2}}"
    datamodule = build(compose_cfg(*TINY, sites, "data.fold_by=site", "data.fold=1").data)
    datamodule.setup()
    assert set(datamodule.datasets["val"].sites) == {1} and len(datamodule.datasets["val"]) == 8  # site b of train
    assert set(datamodule.datasets["train"].sites) == {0, 2} and len(datamodule.datasets["train"]) == 16
    with (tmp_path / "folds.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {(row["fold"], row["site"]) for row in rows} == {("0", "a"), ("1", "b"), ("2", "c")}
    assert len(rows) == 24


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.sites={a: {}, b: {contrst: 0.5}}"], r"data.sites.b: unknown key\(s\) \['contrst'\]; expected some of"),
        (["data.sites={a: {}, b: {gamma: 0}}"], r"data.sites.b: contrast=1.0, gamma=0.0; both must be > 0"),
        (["data.sites={a: {}}"], "expected null or a mapping of at least 2 site names"),
        (
            [SHIFT, "data.train_sites=[c]"],
            r"data.train_sites=\['c'\]: expected a non-empty subset of the sites \['a', 'b'\]",
        ),
        (["data.train_sites=[a]"], r"data.train_sites=\['a'\] needs data.sites"),
    ],
)
def test_bad_site_options(compose_cfg, overrides, message):
    with pytest.raises(MedexpError, match=message):
        build(compose_cfg(*TINY, *overrides).data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.fold_by=site", "data.fold=0"], "data.fold_by=site needs data with sites"),
        (
            [SHIFT, "data.fold_by=site", "data.fold=2"],
            r"data.fold=2 with data.fold_by=site; expected an integer in 0..1",
        ),
        ([SHIFT, "data.train_sites=[a]", "data.fold_by=site", "data.fold=0"], "leaves nothing to train on"),
    ],
)
def test_bad_site_folds(compose_cfg, overrides, message):
    datamodule = build(compose_cfg(*TINY, *overrides).data)
    with pytest.raises(MedexpError, match=message):
        datamodule.setup()


def test_fold_by_is_checked_before_anything_is_built(compose_cfg):
    with pytest.raises(MedexpError, match=r"data.fold_by='patient'; expected one of \['site'\]"):
        validate_config(check_config(compose_cfg("data.fold_by=patient")))


def site_manifest(tmp_path, column: str, sites: list[str]) -> str:
    rng = np.random.default_rng(0)
    rows = [
        {
            "image": write_png(tmp_path / f"i{k}.png", rng.integers(0, 255, (8, 8)).astype(np.uint8)),
            "label": k % 2,
            "split": ["train", "train", "val", "test"][k % 4],
            column: site,
        }
        for k, site in enumerate(sites)
    ]
    return str(write_csv(tmp_path / "cases.csv", rows))


def test_manifest_site_column_reaches_batches_and_folds(tmp_path):
    sites = ["s2", "s1"] * 8
    manifest = site_manifest(tmp_path, "scanner", sites)  # "scanner" names the same column
    common = dict(task="binary", num_classes=2, in_channels=1, spatial_dims=2, manifest=manifest, batch_size=4)
    datamodule = FileDataModule(**common, output_dir=tmp_path / "run")
    assert datamodule.site_names == ["s1", "s2"]  # sorted: the indices do not follow the manifest's order
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["site"].tolist() == [0, 0, 0, 0]  # the test cases are lines 4, 8, ...: all s1
    reused = FileDataModule(
        **{**common, "manifest": tmp_path / "run" / "splits.csv"}
    )  # the split file stays a manifest
    assert reused.site_names == ["s1", "s2"] and [c.site for c in reused.cases["test"]] == ["s1"] * 4
    folds = FileDataModule(**common, fold=0, fold_by="site")  # leave s1 out
    assert {case.site for case in folds.cases["val"]} == {"s1"} and {case.site for case in folds.cases["train"]} == {
        "s2"
    }
    assert len(folds.cases["val"]) == 4 and len(folds.cases["train"]) == 4


def test_manifest_site_column_must_be_filled(tmp_path):
    manifest = site_manifest(tmp_path, "site", ["s1", "", "s2", "s1"])
    with pytest.raises(
        MedexpError, match=r"the site column is empty on 1 line\(s\): line 3; give every image its site"
    ):
        FileDataModule(task="binary", num_classes=2, in_channels=1, spatial_dims=2, manifest=manifest)


def test_batchnorm_adaptation_estimates_each_sites_statistics(compose_cfg):
    """The first BatchNorm layer's input does not depend on any normalisation: its adapted
    statistics per site must be those of the convolution's outputs on that site's test images."""
    cfg = compose_cfg(*TINY, SHIFT)
    datamodule, model = build(cfg.data), build(cfg.model)
    results = {}
    for name, callbacks in {
        "site": [BatchNormAdaptation(enabled=True)],
        "split": [BatchNormAdaptation(enabled=True, per_site=False)],
        "none": [],
    }.items():
        trainer = L.Trainer(logger=False, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)
        results[name] = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        if name == "site":
            adaptation = callbacks[0]
            assert adaptation.domains == ["a", "b"] and adaptation.counts == [16, 16]
    test = datamodule.datasets["test"]
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        features = model.net.features[0].conv(images)  # MONAI Convolution: conv, then BatchNorm
    for site in (0, 1):
        mean, var = adaptation.statistics("net.features.0.adn.N", site)
        chosen = features[torch.as_tensor(test.sites) == site]
        torch.testing.assert_close(mean.float(), chosen.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var.float(), chosen.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert results["site"]["test/site_b/auroc"] != results["none"]["test/site_b/auroc"]
    assert results["split"]["test/site_b/auroc"] not in (
        results["none"]["test/site_b/auroc"],
        results["site"]["test/site_b/auroc"],
    )
    with pytest.raises(
        MedexpError, match=r"callbacks.bn_adapt.enabled=true, but the net \(Sequential\) has no BatchNorm"
    ):
        model.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
        L.Trainer(logger=False, callbacks=[BatchNormAdaptation(enabled=True)], enable_progress_bar=False).test(
            model, datamodule=datamodule, verbose=False
        )


DOMAIN_SHIFT = [
    *QUIET,
    "logger=none",
    SHIFT,
    "data.train_sites=[a]",
    "data.image_size=16",
    "data.lesion_contrast=2",
    "data.num_samples={train: 256, val: 64, test: 128}",
    "trainer.max_epochs=2",
    "optimizer.lr=3e-3",
]


def test_adaptation_on_a_shifted_site_through_medexp_train(tmp_path):
    """Trained on site a only; tested on sites a and b with and without adaptation (the same
    seed trains the same model): per-site metrics in metrics.json, the report's per-site table
    agrees with them, and adaptation lifts the shifted site's AUROC."""
    runs = {}
    for name in ("none", "bn"):
        run = tmp_path / name
        train(compose_config([*DOMAIN_SHIFT, f"callbacks.bn_adapt.enabled={name == 'bn'}"], output_dir=run))
        metrics = json.loads((run / "metrics.json").read_text())
        report = json.loads((run / "report" / "report.json").read_text())
        assert [row["site"] for row in report["per_site"]] == ["a", "b"]
        for row in report["per_site"]:
            assert row["n"] == metrics["test"][f"test/site_{row['site']}/n"] == 64
            for key in ("auroc", "accuracy", "balanced_accuracy"):
                assert row[key] == pytest.approx(metrics["test"][f"test/site_{row['site']}/{key}"], abs=1e-6), key
        assert report["agreement"]["site_b/auroc"]["abs_diff"] < 1e-6
        markdown = (run / "report" / "report.md").read_text()
        assert "## Per site" in markdown and "| a | 64 |" in markdown and "| b | 64 |" in markdown
        runs[name] = metrics
    assert runs["none"]["best_score"] == runs["bn"]["best_score"]  # the same training
    none, bn = runs["none"]["test"], runs["bn"]["test"]
    assert bn["test/site_b/auroc"] > none["test/site_b/auroc"] + 0.05, (none, bn)

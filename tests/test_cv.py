"""k-fold cross-validation: the fold assignment, the data modules, and a CV sweep through the CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

from medexp.data.files import FileDataModule
from medexp.data.folds import assign_folds, check_folds, strata
from medexp.data.synthetic import SyntheticDataModule
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, medexp_main, run_cli

SMALL = ["data.image_size=16", "data.num_samples={train:60,val:20,test:20}", "trainer.max_epochs=1", "logger=csv"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# --- assign_folds: a pure function ---


def test_every_sample_gets_one_fold_and_every_fold_is_used():
    labels = np.random.default_rng(1).integers(0, 3, size=103)
    folds = assign_folds(labels, None, num_folds=5, seed=0)
    assert folds.shape == (103,) and folds.dtype == np.int64
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    assert sorted(np.bincount(folds).tolist()) == [20, 20, 21, 21, 21]


def test_classes_are_spread_over_the_folds_within_one():
    labels = np.array([0] * 90 + [1] * 13 + [2] * 7)
    np.random.default_rng(0).shuffle(labels)
    for k in (2, 3, 5, 7):
        folds = assign_folds(labels, None, k, seed=3)
        for c, n_c in Counter(labels.tolist()).items():
            per_fold = np.bincount(folds[labels == c], minlength=k)
            assert per_fold.min() == n_c // k and per_fold.max() == -(-n_c // k), (k, c, per_fold)
        sizes = np.bincount(folds, minlength=k)
        assert sizes.max() - sizes.min() <= 1, (k, sizes)


def test_patients_are_never_split_and_folds_stay_balanced():
    rng = np.random.default_rng(2)
    images_per_patient = rng.integers(1, 5, size=40)
    groups = np.repeat([f"P{p:02d}" for p in range(40)], images_per_patient)
    labels = np.repeat(rng.integers(0, 2, size=40), images_per_patient)
    folds = assign_folds(labels, groups, num_folds=4, seed=0)
    fold_of = {}
    for group, fold in zip(groups, folds):
        assert fold_of.setdefault(group, fold) == fold, f"patient {group} is in two folds"
    sizes = np.bincount(folds, minlength=4)
    assert sizes.max() - sizes.min() <= images_per_patient.max(), sizes
    for c in (0, 1):  # patients of each class spread over the folds
        patients = Counter(fold_of[g] for g in set(groups[labels == c].tolist()))
        assert max(patients.values()) - min(patients.values()) <= 2 and len(patients) == 4, patients


def test_samples_without_a_patient_id_are_their_own_group():
    groups = ["A", "A", "A", "", None, "", "B", "B"]
    folds = assign_folds(None, groups, num_folds=3, seed=0)
    assert len(set(folds[:3].tolist())) == 1 and len(set(folds[6:].tolist())) == 1
    assert sorted(set(folds.tolist())) == [0, 1, 2]


def test_the_same_inputs_and_seed_give_the_same_folds():
    labels = np.random.default_rng(0).integers(0, 2, size=50)
    first = assign_folds(labels, None, 5, seed=0)
    np.testing.assert_array_equal(first, assign_folds(labels.tolist(), None, 5, seed=0))
    assert not np.array_equal(first, assign_folds(labels, None, 5, seed=1))


def test_strata_of_multilabel_and_segmentation_targets():
    multilabel = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    # label frequencies 3, 3, 1: the rarest positive label of each sample, -1 for none
    assert strata(multilabel, "multilabel").tolist() == [0, 0, -1, 2, 1]
    masks = np.zeros((3, 1, 4, 4), np.uint8)
    masks[1, 0, 2, 2] = 1
    masks[2, 0, 0, 0] = 2
    assert strata(masks, "segmentation").tolist() == [0, 1, 1]
    assert strata(np.array([2, 0, 1]), "multiclass").tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: assign_folds([0, 1, 0, 1], None, 1, 0), r"data.num_folds=1; expected an integer of at least 2"),
        (lambda: assign_folds([0, 1, 0, 1], None, 5, 0), r"data.num_folds=5 but the training split has only 4 samples"),
        (
            lambda: assign_folds(None, ["a", "a", "b", "c"], 4, 0),
            r"data.num_folds=4 but the training split has only 3 patients.*between 2 and 3",
        ),
        (lambda: check_folds(3, 3), r"data.fold=3; expected an integer in 0..2 \(data.num_folds=3\), or null"),
        (lambda: check_folds(-1, 5), r"data.fold=-1; expected an integer in 0..4"),
        (
            lambda: SyntheticDataModule(
                task="binary", num_classes=2, in_channels=1, spatial_dims=2, fold=0, num_folds=0
            ),
            r"data.num_folds=0",
        ),
    ],
    ids=["one-fold", "fewer-samples", "fewer-patients", "fold-too-large", "negative-fold", "data-module"],
)
def test_bad_fold_settings_name_the_key_and_what_is_valid(call, message):
    with pytest.raises(MedexpError, match=message):
        call()


def test_a_fold_of_segmentation_and_multilabel_data(tmp_path):
    common = dict(in_channels=1, spatial_dims=2, image_size=16, num_samples={"train": 30, "val": 5, "test": 5})
    for task in ("segmentation", "multilabel"):
        dm = SyntheticDataModule(task=task, num_classes=2, fold=2, num_folds=3, output_dir=tmp_path / task, **common)
        dm.setup()
        rows = read_csv(tmp_path / task / "folds.csv")
        assert [row["index"] for row in rows] == [str(i) for i in range(30)]
        held_out = [int(row["index"]) for row in rows if row["fold"] == "2"]
        assert len(dm.datasets["val"]) == len(held_out) and len(dm.datasets["train"]) == 30 - len(held_out)
        if task == "segmentation":  # stratified by whether there is a lesion
            assert {row["label"] for row in rows} <= {"foreground", "empty"}
        else:
            assert {row["label"] for row in rows} <= {"0 0", "0 1", "1 0", "1 1"}


# --- a 3-fold CV sweep through `medexp train -m` and `medexp summarize` ---


@pytest.fixture(scope="module")
def cv_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cv")
    run_cli(
        "train",
        "-m",
        "data.fold=range(3)",
        "data.num_folds=3",
        "model.class_weights=auto",
        *SMALL,
        *QUIET,
        "hydra.sweep.dir=sweep",
        cwd=cwd,
    )
    proc = run_cli("summarize", "sweep", cwd=cwd)
    return cwd / "sweep", proc.stdout


def test_every_fold_job_records_the_same_assignment(cv_sweep):
    sweep, _ = cv_sweep
    tables = [(sweep / str(k) / "folds.csv").read_text() for k in range(3)]
    assert tables[0] == tables[1] == tables[2]
    rows = read_csv(sweep / "0" / "folds.csv")
    assert list(rows[0]) == ["index", "label", "fold"]
    train_labels = SyntheticDataModule(
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        image_size=16,
        num_samples={"train": 60, "val": 20, "test": 20},
    ).load_split("train")[1]
    assert [int(row["label"]) for row in rows] == train_labels.tolist()
    assert sorted(Counter(row["fold"] for row in rows).values()) == [20, 20, 20]


def test_the_fold_jobs_validate_on_disjoint_parts_of_the_training_split(cv_sweep):
    sweep, _ = cv_sweep
    folds = np.array([int(row["fold"]) for row in read_csv(sweep / "0" / "folds.csv")])
    seen = []
    for k in range(3):
        # the data module exactly as job k built it
        data = yaml.safe_load((sweep / str(k) / "resolved_config.yaml").read_text())["data"]
        assert data["fold"] == k and data["num_folds"] == 3
        dm = instantiate({**data, "output_dir": None}, _convert_="all")
        dm.setup()
        images, labels = dm.load_split("train")
        held_out = np.flatnonzero(folds == k)
        np.testing.assert_array_equal(dm.datasets["val"].images, images[held_out])
        np.testing.assert_array_equal(dm.datasets["train"].images, images[folds != k])
        np.testing.assert_array_equal(dm.datasets["test"].images, dm.load_split("test")[0])
        # class_weights=auto counts the fold's training part
        counts, total = dm.label_counts()
        assert counts.tolist() == np.bincount(labels[folds != k], minlength=2).tolist() and total == 40
        seen.append(set(held_out.tolist()))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(range(60))


def test_summarize_pools_the_folds(cv_sweep):
    sweep, stdout = cv_sweep
    values = [json.loads((sweep / str(k) / "metrics.json").read_text()) for k in range(3)]
    objective = [m["fit"]["val/auroc_best"] for m in values]
    test_auroc = [m["test"]["test/auroc"] for m in values]
    pooled = {row["metric"]: row for row in read_csv(sweep / "cv_summary.csv")}
    assert list(read_csv(sweep / "cv_summary.csv")[0]) == ["metric", "n", "mean", "std", "ci_low", "ci_high"]
    for name, fold_values in (("val/auroc_best", objective), ("test/auroc", test_auroc)):
        row = pooled[name]
        assert int(row["n"]) == 3
        assert float(row["mean"]) == pytest.approx(np.mean(fold_values))
        assert float(row["std"]) == pytest.approx(np.std(fold_values, ddof=1))
        assert min(fold_values) - 1e-9 <= float(row["ci_low"]) <= float(row["ci_high"]) <= max(fold_values) + 1e-9
    summary = read_csv(sweep / "summary.csv")
    assert [row["data.fold"] for row in summary] == [str(k) for k in sorted(range(3), key=lambda k: -objective[k])]
    assert all(row["status"] == "complete" for row in summary)
    assert "| val/auroc_best | 3 |" in stdout and "# Cross-validation in sweep" in stdout
    assert (sweep / "summary.md").read_text() in stdout and (sweep / "cv_summary.md").is_file()
    png = (sweep / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_fold_outside_num_folds_stops_the_run(tmp_path):
    args = ["data.fold=3", "data.num_folds=3", *SMALL, *QUIET, "hydra.run.dir=run"]
    proc = medexp_main("train", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "medexp: error: data.fold=3; expected an integer in 0..2 (data.num_folds=3)" in proc.stderr


# --- files with patient IDs ---


def patient_manifest(folder: Path) -> Path:
    """12 training patients with 1-3 PNGs each and a class per patient, 3 test patients, no val split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for p in range(15):
        label = p % 2
        for k in range(1 + p % 3):
            image = rng.integers(0, 100, size=(16, 16)).astype(np.uint8) + np.uint8(100 * label)
            path = folder / "images" / f"p{p}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            rows.append(
                {
                    "image": f"images/{path.name}",
                    "label": label,
                    "split": "train" if p < 12 else "test",
                    "patient_id": f"P{p:02d}",
                }
            )
    manifest = folder / "cases.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_file_folds_keep_each_patient_in_one_fold(tmp_path):
    manifest = patient_manifest(tmp_path / "data")
    args = dict(task="binary", num_classes=2, in_channels=1, spatial_dims=2, manifest=manifest, num_folds=3)
    patients_of_fold = []
    for k in range(3):
        dm = FileDataModule(fold=k, **args)
        train = {case.patient_id for case in dm.cases["train"]}
        val = {case.patient_id for case in dm.cases["val"]}
        assert not train & val, f"fold {k}: patients in train and val"
        assert train | val == {f"P{p:02d}" for p in range(12)}
        assert {case.patient_id for case in dm.cases["test"]} == {"P12", "P13", "P14"}
        # stratified: each class has 12 training images, 4 per fold
        assert Counter(case.label for case in dm.cases["val"]) == {0: 4, 1: 4}, k
        counts, total = dm.label_counts()  # class_weights=auto sees the fold's training part
        assert counts.tolist() == [8, 8] and total == 16
        patients_of_fold.append(val)

    # through the CLI: folds.csv and splits.csv of the run agree
    medexp_main(
        "train",
        "data=files",
        f"data.manifest={manifest}",
        "data.fold=1",
        "data.num_folds=3",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "logger=csv",
        *QUIET,
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    folds = read_csv(tmp_path / "run" / "folds.csv")
    assert list(folds[0]) == ["image", "patient_id", "label", "fold"] and len(folds) == 24
    fold_of = {}
    for row in folds:
        assert fold_of.setdefault(row["patient_id"], row["fold"]) == row["fold"], row
    splits = read_csv(tmp_path / "run" / "splits.csv")
    val_images = sorted(row["image"] for row in splits if row["split"] == "val")
    assert val_images == sorted(row["image"] for row in folds if row["fold"] == "1")
    assert {fold_of[p] for p in patients_of_fold[1]} == {"1"}
    assert "test/auroc" in json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]

"""Encryption at rest: checkpoints written encrypted, read back by train (test, resume), eval and
predict with the key, refused clearly without it or with another."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medexp.data.phantoms import make_phantoms
from medexp.eval import evaluate
from medexp.predict import predict
from medexp.privacy.encryption import (
    MAGIC,
    decrypt_bytes,
    encrypt_bytes,
    generate_key,
    is_encrypted_file,
    load_torch,
    save_torch,
)
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, run_cli

# not MEDEXP_KEY: a key in the environment of whoever runs the tests must not change them
KEY_ENV = "MEDEXP_TEST_KEY"
RUN = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 64, val: 32, test: 32}",
    "data.batch_size=32",
    "report=false",
    f"encryption.key_env={KEY_ENV}",
]


def test_bytes_round_trip_in_chunks_and_tampering_is_refused(monkeypatch):
    monkeypatch.setenv(KEY_ENV, generate_key())
    data = np.random.default_rng(0).bytes(1000)
    # 7-byte chunks: 143 of them, the last one short; and an exact multiple, and nothing at all
    for payload in (data, data[:994], b""):
        sealed = encrypt_bytes(payload, KEY_ENV, chunk_size=7)
        assert sealed.startswith(MAGIC) and (not payload or payload[:32] not in sealed)
        assert decrypt_bytes(sealed, "test data") == payload
    sealed = encrypt_bytes(data, KEY_ENV, chunk_size=7)
    flipped = bytearray(sealed)
    flipped[len(sealed) // 2] ^= 1
    # a flipped bit, a dropped final chunk (ends on a chunk boundary) and a cut in the middle
    for broken in (bytes(flipped), sealed[: -(len(data) % 7 + 16)], sealed[:-3]):
        with pytest.raises(MedexpError, match=f"cannot decrypt test data with the key in {KEY_ENV}"):
            decrypt_bytes(broken, "test data")


def test_a_missing_or_malformed_key_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, generate_key())
    path = tmp_path / "cache" / "item.pt"
    save_torch({"x": torch.arange(3)}, path, KEY_ENV)
    assert is_encrypted_file(path) and torch.equal(load_torch(path)["x"], torch.arange(3))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MedexpError, match=f"file {path} is encrypted; set {KEY_ENV}"):
        load_torch(path)
    monkeypatch.setenv(KEY_ENV, "not-a-key")
    with pytest.raises(MedexpError, match=f"{KEY_ENV} does not hold a medexp key"):
        load_torch(path)
    # training with the variable unset stops before anything is built
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MedexpError, match=f"encryption.key_env={KEY_ENV}, but {KEY_ENV} is not set"):
        train(compose_config(RUN, output_dir=tmp_path / "run"))


@pytest.fixture(scope="module")
def key() -> str:
    return generate_key()


@pytest.fixture(scope="module")
def encrypted_run(tmp_path_factory, key):
    """Two epochs with encryption.key_env=MEDEXP_KEY; best.ckpt is read back for val and test."""
    run = tmp_path_factory.mktemp("encrypted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, key)
        # with temperature scaling, which rewrites best.ckpt after fit: it must stay sealed
        metrics = train(compose_config([*RUN, "trainer.max_epochs=2", "model.calibrate=true"], output_dir=run))
    return run, metrics


def test_checkpoints_are_encrypted_and_train_reads_them_back(encrypted_run, key, monkeypatch):
    run, metrics = encrypted_run
    monkeypatch.setenv(KEY_ENV, key)
    for name in ("best.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        assert path.read_bytes().startswith(MAGIC)
        with pytest.raises(Exception):  # noqa: B017 - not a torch file without decryption
            torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    # the calibrated best.ckpt (still sealed, checked above) holds the fitted temperature
    assert load_torch(run / "checkpoints" / "best.ckpt")["state_dict"]["temperature"] == pytest.approx(
        metrics["calibration"]["temperature"]
    )
    # validate/test after fit loaded best.ckpt through the trainer's checkpoint I/O: the validation
    # loss (of the logits, before the temperature) is the NLL calibration measured on its weights.
    # (Not AUROC: a near-random model gets the largest temperature, 100, and float32 probabilities
    # within 1e-7 of 0.5 tie, which moves AUROC by a percent.)
    assert metrics["val"]["val/loss"] == pytest.approx(metrics["calibration"]["nll_before"], abs=1e-5)
    assert 0.0 <= metrics["test"]["test/auroc"] <= 1.0


def test_eval_predict_and_resume_with_the_key(encrypted_run, key, tmp_path, monkeypatch):
    run, metrics = encrypted_run
    monkeypatch.setenv(KEY_ENV, key)
    best = run / "checkpoints" / "best.ckpt"
    results = evaluate(compose_config([f"ckpt_path={best}", *QUIET[2:]], "eval", output_dir=tmp_path / "eval"))
    assert results["test"]["test/auroc"] == pytest.approx(metrics["test"]["test/auroc"], abs=1e-6)

    images, _, _ = make_phantoms(3, 16, "binary", 2, np.random.default_rng(3))
    for index, image in enumerate(images):
        Image.fromarray(image[0]).save(tmp_path / f"case{index}.png")
    table = predict(
        compose_config(
            [
                f"ckpt_path={best}",
                f"input={tmp_path}/*.png",
                f"output={tmp_path}/preds",
                "trainer.enable_progress_bar=false",
            ],
            "predict",
            output_dir=tmp_path / "predict",
        )
    )
    with table.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 and all(abs(float(r["p_0"]) + float(r["p_1"]) - 1) < 1e-5 for r in rows)

    # resume the run from its encrypted last.ckpt for a third epoch, in its own directory
    last = run / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*RUN, "trainer.max_epochs=3", f"ckpt_path={last}"], output_dir=run))
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        epochs = {row["epoch"] for row in csv.DictReader(file) if row.get("train/loss")}
    assert epochs == {"0", "1", "2"}
    assert json.loads((run / "run_info.json").read_text())["resumed_from"] == [str(last)]
    assert resumed["status"] == "complete" and last.read_bytes().startswith(MAGIC)


def test_without_the_key_or_with_another_medexp_refuses(encrypted_run, tmp_path, monkeypatch):
    run, _ = encrypted_run
    best = run / "checkpoints" / "best.ckpt"
    # the CLI runs without MEDEXP_KEY in its environment
    proc = run_cli("eval", f"ckpt_path={best}", "hydra.run.dir=eval", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert f"medexp: error: checkpoint {best} is encrypted; set {KEY_ENV}" in proc.stderr
    monkeypatch.setenv(KEY_ENV, generate_key())
    with pytest.raises(MedexpError, match=f"cannot decrypt checkpoint {best} with the key in {KEY_ENV}"):
        evaluate(compose_config([f"ckpt_path={best}"], "eval", output_dir=tmp_path / "eval2"))
    # resuming reads the checkpoint through the trainer's checkpoint I/O: the same message
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(MedexpError, match=f"cannot decrypt checkpoint {last} with the key in {KEY_ENV}"):
        train(compose_config([*RUN, "trainer.max_epochs=5", f"ckpt_path={last}"], output_dir=tmp_path / "resumed"))


def test_the_disk_cache_of_file_data_is_encrypted_with_the_run_key(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv(KEY_ENV, generate_key())
    rows = ["image,label"]
    for i in range(12):
        Image.fromarray(np.full((16, 16), 20 * i, dtype=np.uint8)).save(tmp_path / f"case{i}.png")
        rows.append(f"case{i}.png,{i % 2}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"

    def first_batch(*overrides: str) -> dict:
        cfg = compose_config(
            [
                "data=files",
                f"data.manifest={tmp_path / 'cases.csv'}",
                "data.batch_size=4",
                "data.scan=off",
                f"data.cache_dir={cache}",
                *overrides,
            ],
            output_dir=tmp_path / "run",
        )
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        return next(iter(datamodule.val_dataloader()))

    plain = first_batch()
    sealed = first_batch("data.cache=disk", f"encryption.key_env={KEY_ENV}")
    assert torch.equal(plain["image"], sealed["image"]) and torch.equal(plain["label"], sealed["label"])
    files = sorted(cache.glob("*.pt"))
    assert files and all(is_encrypted_file(path) for path in files)
    again = first_batch("data.cache=disk", f"encryption.key_env={KEY_ENV}")  # read back from the cache
    assert torch.equal(again["image"], plain["image"])
    monkeypatch.setenv(KEY_ENV, generate_key())
    with pytest.raises(MedexpError, match=f"cannot decrypt cached case .* with the key in {KEY_ENV}"):
        first_batch("data.cache=disk", f"encryption.key_env={KEY_ENV}")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MedexpError, match=f"cached case .* is encrypted; set {KEY_ENV}"):
        first_batch("data.cache=disk")  # a run without the key cannot read the sealed cache

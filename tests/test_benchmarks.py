"""The benchmarks under scripts/bench/ run, in a seconds-long configuration: correctness only (no
timing is asserted; figures come from full runs, see docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "scripts" / "bench"


def run_tiny(script: str, tmp_path) -> dict:
    out = tmp_path / "result.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--tiny", "--threads", "1", "--save", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["tiny"] is True and record["machine"]["torch"]
    return record


def test_overhead_benchmark_compares_medexp_with_a_raw_loop_taking_the_same_steps(tmp_path):
    record = run_tiny("overhead.py", tmp_path)
    # same seed, net, batches and optimiser: the raw loop reproduces medexp's losses
    assert record["losses_agree_1e-5"] and record["loss_steps_compared"] == 4
    assert record["medexp_ms_per_step"] > 0 and record["raw_ms_per_step"] > 0


def test_data_benchmark_times_medmnist_and_cached_3d_files(tmp_path):
    record = run_tiny("data.py", tmp_path)
    assert record["medmnist"]["images"] == 64 and record["medmnist"]["ratio"] > 0
    files = record["files_3d"]
    assert files["volumes"] == 4 and files["memory_speedup"] > 0 and files["disk_speedup"] > 0


@pytest.mark.parametrize("script", ["startup.py", "predict.py"])
def test_startup_and_predict_benchmarks_run(script, tmp_path):
    record = run_tiny(script, tmp_path)
    if script == "startup.py":
        assert 0 < record["cfg_job_s"] and 0 < record["help_s"] and record["first_step_s"] > record["python_s"]
    else:  # the script itself checks that predict wrote one row per image
        assert record["medexp_images_per_s"] > 0 and record["model_only_images_per_s"] > 0

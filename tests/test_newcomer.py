"""A newcomer's first hour: `medexp` alone, `--version`, tab completion and the Python API
(`medexp.train`, `medexp.evaluate`, `medexp.load`), each through what a user runs."""

from __future__ import annotations

import csv
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medexp.cli import COMMANDS
from tests.conftest import ENV, QUIET, REPO, run_cli

MEDEXP = Path(sys.executable).with_name("medexp")
# bash's default COMP_WORDBREAKS: it completes only the part of a word after the last of these
WORDBREAKS = " \t\n\"'><=;|&(:"
TINY = [*QUIET, "trainer.max_epochs=2", "data.num_samples={train: 128, val: 64, test: 64}", "data.batch_size=32"]


def test_medexp_alone_lists_every_command_with_its_help(tmp_path):
    for args in ((), ("--help",)):
        out = run_cli(*args, cwd=tmp_path).stdout
        for name, (_, help_) in COMMANDS.items():
            assert f"  {name}" in out and help_ in out, name
        assert "--version" in out and "medexp train" in out


def test_version_names_medexp_and_its_libraries(tmp_path):
    out = run_cli("--version", cwd=tmp_path).stdout.strip()
    import medexp

    assert out.startswith(f"medexp {medexp.__version__} (torch ")
    assert "lightning " in out and "monai " in out and len(out.splitlines()) == 1


def test_importing_medexp_imports_nothing_heavy(tmp_path):
    script = (
        "import sys, medexp; heavy = [m for m in ('torch', 'lightning', 'monai', 'hydra') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(medexp.train) and callable(medexp.evaluate); "
        "import medexp.train as command; assert command.__name__ == 'medexp.train' and callable(command.train)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- tab completion ---


def complete(line: str, wordbreaks: str = WORDBREAKS) -> list[str]:
    """What `medexp completion query` (the shell's call on TAB) offers for ``line``."""
    env = {**ENV, "COMP_LINE": line, "COMP_POINT": str(len(line)), "COMP_WORDBREAKS": wordbreaks}
    proc = subprocess.run(
        [str(MEDEXP), "completion", "query"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.split()


def test_completion_of_commands_groups_options_and_keys():
    assert set(complete("medexp ")) >= set(COMMANDS)
    assert complete("medexp tr") == ["train"]
    # a config group's options: bash replaces only the part after `=` (a word break)
    assert {"resnet18", "resnet50", "unet"} <= set(complete("medexp train model="))
    assert complete("medexp train model=resnet1") == ["resnet10_fast", "resnet18", "resnet18_3d"]
    assert "model=resnet18" in complete("medexp train model=", wordbreaks="")  # zsh: whole words
    assert "trainer.max_epochs=" in complete("medexp train trainer.max_")
    # keys of the config the earlier overrides compose, and a key's current value
    assert "model.net.channels." in complete("medexp train model=unet model.net.")
    assert complete("medexp train trainer.max_epochs=") == ["5"]
    # every Hydra command completes its own config
    assert "splits=" in complete("medexp eval spl") or "splits." in complete("medexp eval spl")
    assert "input=" in complete("medexp predict inp")
    assert complete("medexp completion ") == ["bash", "zsh"]
    assert complete("medexp train --he") == ["--help"]


def test_the_bash_function_completes_through_the_installed_command(tmp_path):
    script = run_cli("completion", "bash", cwd=tmp_path).stdout
    assert "complete -o default -F _medexp_completion medexp" in script
    # bash splits `model=resn` at `=` and completes the part after it
    line = textwrap.dedent(
        """
        eval "$(medexp completion bash)"
        COMP_LINE="medexp train model=resn"; COMP_POINT=${#COMP_LINE}
        COMP_WORDS=(medexp train model = resn); COMP_CWORD=4
        _medexp_completion
        printf '%s\\n' "${COMPREPLY[@]}"
        """
    )
    env = {**ENV, "PATH": f"{MEDEXP.parent}{os.pathsep}{ENV['PATH']}"}
    proc = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["resnet10_fast", "resnet18", "resnet18_3d", "resnet50"]


def type_with_tab(shell: str, typed: str, home: Path) -> str:
    """Type ``typed`` and TAB into an interactive ``shell`` (on a terminal) that installed
    medexp's completion as the README says; the line TAB completed it to."""
    argv = {"bash": ["bash", "--norc", "--noprofile", "-i"], "zsh": ["zsh", "-f", "-i"]}[shell]
    env = {**ENV, "PATH": f"{MEDEXP.parent}{os.pathsep}{ENV['PATH']}", "HOME": str(home), "PS1": "$ ", "TERM": "dumb"}
    for name in ("EDITOR", "VISUAL"):  # emacs keys: Ctrl-A goes to the start of the line
        env.pop(name, None)
    main, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    # the completed line is then echoed: Ctrl-A, a marker in front, Enter
    os.write(main, f'eval "$(medexp completion {shell})"\n{typed}\t\x01echo DONE: \x05\nexit\n'.encode())
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([main], [], [], 0.5)[0]:
            try:
                output += os.read(main, 65536)
            except OSError:
                break
    proc.kill()
    proc.wait()
    os.close(main)
    done = [line for line in output.decode(errors="replace").splitlines() if line.startswith("DONE: ")]
    assert done, output.decode(errors="replace")[-2000:]
    return done[-1][len("DONE: ") :].strip()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_tab_completes_in_an_interactive_shell(tmp_path, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    assert type_with_tab(shell, "medexp tra", tmp_path) == "medexp train"
    assert type_with_tab(shell, "medexp train model=resnet5", tmp_path) == "medexp train model=resnet50"
    assert type_with_tab(shell, "medexp train trainer.max_ep", tmp_path) == "medexp train trainer.max_epochs="


def test_hydra_shell_completion_of_one_command_points_to_medexp_completion(tmp_path):
    proc = run_cli("train", "-sc", "install=bash", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and 'eval "$(medexp completion bash)"' in proc.stderr


# --- the Python API, from a script as a user writes one ---

API_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
import medexp
from medexp.utils.errors import MedexpError

overrides = json.loads(sys.argv[1])
run = medexp.train(overrides)
evaluated = medexp.evaluate(run["best_checkpoint"], overrides=["splits=[val,test]", "trainer.enable_progress_bar=false"])
again = medexp.evaluate(run["best_checkpoint"], overrides="trainer.enable_progress_bar=false")  # within a second or not
loaded = medexp.load(run["best_checkpoint"])
pixels = np.asarray(Image.open("scan.png"))
errors = {}
from medexp.utils.runlock import RunDirLock
RunDirLock("busy").acquire()  # as a run that goes on in this directory
for name, call in {
    "busy_run_dir": lambda: medexp.train(["hydra.run.dir=busy"]),
    "unknown_model": lambda: medexp.train(["model=resnet19"]),
    "missing_checkpoint": lambda: medexp.evaluate("missing.ckpt"),
    "sweep": lambda: medexp.train(["-m", "seed=1,2"]),
    "bad_array": lambda: loaded.predict(np.zeros((3, 8, 8, 8), dtype=np.float32)),
}.items():
    try:
        call()
    except MedexpError as exc:
        errors[name] = str(exc)
result = {
    "run": run,
    "evaluated": evaluated,
    "again": again["run_dir"],
    "training": loaded.model.training,
    "file": loaded.predict("scan.png").tolist(),
    "array": loaded.predict(pixels).tolist(),
    "both": loaded.predict(["scan.png", pixels]).tolist(),
    "errors": errors,
}
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A script that trains on the synthetic data, evaluates the best checkpoint, loads it and
    predicts on a PNG, run from its own directory."""
    cwd = tmp_path_factory.mktemp("api")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(cwd / "scan.png")
    (cwd / "script.py").write_text(API_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "script.py", json.dumps([*TINY, "report=false"])],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return cwd, json.loads(line[len("RESULT") :])


def test_api_train_returns_the_metrics_of_a_proper_run_directory(api):
    cwd, result = api
    run = result["run"]
    run_dir = Path(run.pop("run_dir"))
    assert run_dir.parent == cwd / "logs" / "train" / "runs"
    assert run == json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= run["test"]["test/auroc"] <= 1 and Path(run["best_checkpoint"]).is_file()
    # what `medexp train` writes: Hydra's record, the log, the run record with the call
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert overrides == [*TINY, "report=false"]
    assert (run_dir / "train.log").is_file() and not (run_dir / ".lock").exists()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["command"] == ["medexp.train", *TINY, "report=false"]


def test_api_evaluate_reproduces_the_recorded_metrics(api):
    cwd, result = api
    evaluated, run = result["evaluated"], result["run"]
    assert Path(evaluated["run_dir"]).parent == cwd / "logs" / "eval" / "runs"
    assert Path(result["again"]).parent == Path(evaluated["run_dir"]).parent and result["again"] != evaluated["run_dir"]
    for split in ("val", "test"):
        assert evaluated[split].keys() == run[split].keys()
        for name, value in run[split].items():
            assert evaluated[split][name] == pytest.approx(value, abs=1e-6), name


def test_api_load_predicts_as_medexp_predict(api):
    cwd, result = api
    assert result["training"] is False
    run_cli(
        "predict",
        f"ckpt_path={result['run']['best_checkpoint']}",
        "input=scan.png",
        "output=preds",
        *QUIET[2:],
        cwd=cwd,
    )
    with (cwd / "preds" / "predictions.csv").open() as table:
        row = next(csv.DictReader(table))
    written = [float(row[column]) for column in row if column not in ("image", "prediction")]
    assert result["file"] == pytest.approx(written, rel=1e-5, abs=1e-6)
    assert result["array"] == pytest.approx(result["file"], abs=1e-7)  # the PNG's pixels predict as the PNG
    assert np.allclose(result["both"], [result["file"], result["file"]], atol=1e-7)


def test_api_errors_are_one_line_medexp_errors(api):
    errors = api[1]["errors"]
    assert "Could not find 'model/resnet19'" in errors["unknown_model"] and "resnet18" in errors["unknown_model"]
    assert errors["missing_checkpoint"] == "ckpt_path='missing.ckpt': no such file"
    assert "takes overrides only" in errors["sweep"] and "medexp train -m" in errors["sweep"]
    assert "expected (H, W)" in errors["bad_array"]
    assert "is in use by another run" in errors["busy_run_dir"]
    assert all("\n" not in message for message in errors.values())

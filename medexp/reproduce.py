"""``medexp reproduce RUN_DIR|CHECKPOINT``: train again from a past run's config; compare metrics.

The run is rebuilt from what it recorded: Hydra's composed config (``.hydra/config.yaml``; for a
bare checkpoint, the resolved config stored inside it) and the seed it actually used
(``run_info.json``), so config files edited since do not change it. Before training it warns
when the git commit or package versions differ from the recorded ones; after training, when the
data fingerprint differs; then it prints recorded vs reproduced metrics and writes
``reproduction.json`` into the new run directory. With ``trainer.deterministic=true`` on a CPU
the metrics come out identical.

    medexp reproduce logs/train/runs/2026-11-22_10-00-00
    medexp reproduce logs/train/runs/2026-11-22_10-00-00/checkpoints/best.ckpt --strict
    medexp reproduce RUN_DIR trainer.accelerator=cpu         # overrides for the new run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.rundir import read_json, run_dir_of

log = logging.getLogger("medexp")


def recorded_config(source: Path, allowed_targets: Sequence[str] = ()) -> tuple[dict[str, Any], Path | None]:
    """The config of the run at ``source`` (run directory or checkpoint), with its seed, and
    the run directory (None for a checkpoint outside one).

    Raises:
        MedexpError: when it builds anything beyond what medexp builds and ``allowed_targets``
            (see :mod:`medexp.checkpoints.allowlist`), or uses a resolver that could.
    """
    from omegaconf import OmegaConf

    from medexp.checkpoints.allowlist import FETCHING, make_inert, refuse_interpolations

    where = f"the config recorded in {source}"
    run_dir = run_dir_of(source)
    if run_dir is not None:
        config_file = run_dir / ".hydra" / "config.yaml"
        try:
            config = OmegaConf.to_container(OmegaConf.load(config_file))
        except Exception as exc:  # noqa: BLE001 - YAML and OmegaConf raise many types
            raise MedexpError(f"{config_file}: not a readable config ({str(exc).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise MedexpError(f"{config_file}: expected a mapping of config groups")
        _refuse_resolvers(config, where)
        seed = read_json(run_dir / "run_info.json").get("seed")
    elif source.is_file():
        from medexp.checkpoints.checkpoint import Checkpoint

        config = Checkpoint(source).config
        refuse_interpolations(config, where)
        config = _unpin_paths(config, str(config["paths"]["output_dir"]))
        seed = config.get("seed")
    else:
        raise MedexpError(f"{source}: neither a run directory (with .hydra/) nor a checkpoint file")
    from medexp.checkpoints.allowlist import check_targets

    for key in ("hydra", "defaults"):  # Hydra's own settings and composition stay medexp's
        if key in config:
            raise MedexpError(f"refusing to build {where}: it sets {key!r}, which a recorded run config never holds")
    check_targets(config, allowed_targets, where=where)
    config = make_inert(config, FETCHING)
    if seed is not None:
        config["seed"] = seed  # the seed drawn when the run had seed=null
    # a sweep's pruning callback talks to that sweep's study; a reproduction trains alone
    (config.get("callbacks") or {}).pop("optuna_pruning", None)
    # a resumed run is reproduced from scratch; resuming is exact, so the metrics still match
    config["ckpt_path"] = None
    return config, run_dir


# resolvers a recorded config may use: medexp's own (pure functions of their arguments), oc.select and
# Hydra's run settings; `oc.env` would copy secrets (an encryption key) into the run, and
# `oc.decode`/`oc.create` build nodes, a `_target_` among them, after the checks
RECORDED_RESOLVERS = (
    "hydra",
    "now",
    "oc.select",
    "medmnist",
    "epoch_fraction",
    "monitor_mode",
    "gpus_per_node",
    "span",
    "plus_if",
    "floordiv",
    "slice_axis",
    "repeat",
)


def _refuse_resolvers(config: Any, where: str) -> None:
    """Refuse resolvers outside :data:`RECORDED_RESOLVERS`, and dict or list literals passed to
    any resolver (``${repeat:{_target_: ...},1}`` would build a node no check saw)."""
    import re

    def strings(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            for name, value in node.items():
                yield from strings(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from strings(value, f"{key}.{index}")
        elif isinstance(node, str):
            yield key, node

    for key, value in strings(config, ""):
        for name in re.findall(r"\$\{\s*([\w.]+)\s*:", value):
            if name not in RECORDED_RESOLVERS:
                raise MedexpError(
                    f"refusing to build {where}: {key}={value!r} calls the resolver {name!r}; recorded "
                    f"configs may use only {list(RECORDED_RESOLVERS)}"
                )
        if "${" in value and re.search(r"[{\[]", value.replace("${", "")):
            raise MedexpError(f"refusing to build {where}: {key}={value!r} passes a mapping or list to a resolver")


def _unpin_paths(value: Any, old_output_dir: str) -> Any:
    """A resolved config's paths into the old run directory -> the new run's directory."""
    if isinstance(value, dict):
        return {key: _unpin_paths(item, old_output_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_unpin_paths(item, old_output_dir) for item in value]
    if isinstance(value, str) and value.startswith(old_output_dir):
        return "${paths.output_dir}" + value[len(old_output_dir) :]
    return value


def environment_warnings(recorded: dict[str, Any]) -> list[str]:
    """How this machine's code and packages differ from those recorded in ``run_info.json``."""
    import medexp
    from medexp.utils.run_info import git_state, package_versions

    warnings = []
    then = (recorded.get("git") or {}).get("medexp")
    now = git_state(Path(medexp.__file__).resolve().parent)
    if then and now and then.get("commit") != now.get("commit"):
        warnings.append(f"git commit {now['commit'][:12]} differs from the recorded {then['commit'][:12]}")
    if now and now.get("dirty"):
        warnings.append("the medexp work tree has uncommitted changes")
    if then and then.get("dirty"):
        warnings.append("the recorded run had uncommitted changes; its code cannot be restored exactly")
    versions = package_versions()
    for name, version in (recorded.get("versions") or {}).items():
        if versions.get(name) != version:
            warnings.append(f"{name} {versions.get(name)} differs from the recorded {version}")
    return warnings


def compare(recorded: dict[str, Any], reproduced: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """``(metric, recorded, reproduced)`` for the best score and every val/test metric."""
    rows = [("best_score", recorded.get("best_score"), reproduced.get("best_score"))]
    for section in ("val", "test"):
        names = sorted(set(recorded.get(section, {})) | set(reproduced.get(section, {})))
        rows += [(name, recorded.get(section, {}).get(name), reproduced.get(section, {}).get(name)) for name in names]
    return rows


def _difference(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    return abs(a - b)


def reproduce(
    source: Path, output: Path | None, overrides: list[str], tolerance: float, allowed_targets: Sequence[str] = ()
) -> dict[str, Any]:
    """Train the run at ``source`` again into ``output``; returns the comparison (also written
    to ``<output>/reproduction.json``)."""
    from omegaconf import OmegaConf

    from medexp.utils.run_info import write_json

    config, run_dir = recorded_config(source, allowed_targets)
    info = read_json(run_dir / "run_info.json") if run_dir else {}
    recorded = read_json(run_dir / "metrics.json") if run_dir else {}
    for warning in environment_warnings(info):
        log.warning("reproduce: %s", warning)
    if output is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        output = Path(str(config.get("paths", {}).get("log_dir", "logs"))) / "reproduce" / "runs" / stamp
    output = output.resolve()

    with tempfile.TemporaryDirectory() as config_dir:
        # the recorded config becomes the primary config; medexp's hydra/ settings still apply
        OmegaConf.save(
            OmegaConf.create({"defaults": [{"hydra": "default"}, "_self_"], **config}), Path(config_dir) / "run.yaml"
        )
        command = [
            sys.executable, "-m", "medexp.train", "--config-dir", config_dir, "--config-name", "run",
            f"hydra.run.dir={output}", *overrides,
        ]  # fmt: skip
        log.info("reproducing %s in %s", source, output)
        # train checks the resolved config too (see medexp.train): what interpolations made
        from medexp.checkpoints.allowlist import RECORDED_CONFIG_ENV

        environment = {**os.environ, RECORDED_CONFIG_ENV: json.dumps([str(name) for name in allowed_targets])}
        if subprocess.run(command, env=environment).returncode != 0:
            raise MedexpError(f"the reproduction of {source} failed; see {output}")

    new_info = read_json(output / "run_info.json")
    reproduced = read_json(output / "metrics.json")
    then, now = info.get("data_fingerprint"), new_info.get("data_fingerprint")
    if then and now and then != now:
        log.warning(
            "reproduce: the data differ from the recorded run's (fingerprint %s..., recorded %s...)",
            now[:12],
            then[:12],
        )
    rows = compare(recorded, reproduced) if recorded else []
    differences = {name: _difference(a, b) for name, a, b in rows}
    result = {
        "source": str(source),
        "output": str(output),
        "run_dir": str(run_dir) if run_dir else None,
        "same_data": None if not (then and now) else then == now,
        "environment_warnings": environment_warnings(info),
        "identical": bool(rows) and all(d == 0 for d in differences.values()),
        "within_tolerance": bool(rows) and all(d <= tolerance for d in differences.values()),
        "tolerance": tolerance,
        "max_abs_difference": max(differences.values(), default=None),
        "metrics": {name: {"recorded": a, "reproduced": b} for name, a, b in rows},
    }
    write_json(output / "reproduction.json", result)
    print(_table(rows, tolerance))
    return result


def _table(rows: list[tuple[str, float | None, float | None]], tolerance: float) -> str:
    if not rows:
        return "the source recorded no metrics.json; nothing to compare"
    lines = [f"{'metric':<28} {'recorded':>12} {'reproduced':>12} {'difference':>11}"]
    for name, a, b in rows:
        d = _difference(a, b)
        mark = "" if d <= tolerance else "  <-"
        show = lambda v: "-" if v is None else f"{v:.6f}"  # noqa: E731
        lines.append(f"{name:<28} {show(a):>12} {show(b):>12} {d:>11.2e}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medexp reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory, or a checkpoint (.ckpt)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the new run, e.g. trainer.accelerator=cpu")
    parser.add_argument("--output", type=Path, help="the new run directory (default: logs/reproduce/runs/<time>)")
    parser.add_argument(
        "--tolerance", type=float, default=0.0, help="largest metric difference that counts as reproduced"
    )
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="NAME",
        help="trust the `_target_` NAME (an exact dotted name) in the recorded config besides what medexp builds",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 3 unless every metric is within --tolerance"
    )
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with user_errors():
        if not args.source.exists():
            raise MedexpError(f"{args.source}: no such run directory or checkpoint")
        result = reproduce(args.source, args.output, args.overrides, args.tolerance, args.allow_target)
    verdict = "identical" if result["identical"] else "within tolerance" if result["within_tolerance"] else "DIFFERENT"
    print(f"reproduction: {verdict} (max abs difference {result['max_abs_difference']}); new run: {result['output']}")
    if args.strict and not result["within_tolerance"]:
        raise SystemExit(3)


if __name__ == "__main__":
    main()

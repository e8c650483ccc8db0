"""The ``medexp`` command: ``medexp <command> [hydra overrides]``."""

from __future__ import annotations

import os
import runpy
import sys

COMMANDS = {
    "train": ("medexp.train", "fit a model, then test its best checkpoint"),
    "eval": ("medexp.eval", "evaluate a checkpoint (ckpt_path=...) with its stored config"),
    "predict": ("medexp.predict", "apply a checkpoint to new images (ckpt_path=... input=... output=...)"),
    "explain": ("medexp.explain", "saliency maps (Grad-CAM, occlusion) of a classifier, scored against lesion masks"),
    "export": (
        "medexp.export",
        "export a checkpoint as ONNX, a torch.export program or a MONAI bundle, verified against the model",
    ),
    "compress": (
        "medexp.compress",
        "int8 quantization (method=dynamic|static) or pruning sweep of a classifier; size, latency, metrics",
    ),
    "federate": (
        "medexp.federate",
        "federated learning (FedAvg/FedProx) over simulated sites; per-site and global metrics",
    ),
    "sample": ("medexp.sample", "generate images with a GAN checkpoint (ckpt_path=... n=64 output=...)"),
    "reproduce": ("medexp.reproduce", "train a past run again from its recorded config and seed; compare metrics"),
    "summarize": ("medexp.summarize", "tabulate and plot the runs of a sweep (DIR [--metric NAME]); CV folds pooled"),
    "completion": (
        "medexp.completion",
        'tab completion of commands, config groups and keys: eval "$(medexp completion bash)"',
    ),
}

USAGE = (
    "usage: medexp <command> [hydra overrides...]\n\ncommands:\n"
    + "\n".join(f"  {name:<12}{help_}" for name, (_, help_) in COMMANDS.items())
    + "\n\nStart with `medexp train` (synthetic data, about a minute on a CPU)."
    + "\n`medexp <command> --help` lists the config groups and options (reproduce, summarize: their arguments)."
    + "\n--verbose: full tracebacks on errors (as HYDRA_FULL_ERROR=1). --version: medexp's version and its libraries'."
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return
    if sys.argv[1] in ("-V", "--version"):
        print(version())
        return
    command = sys.argv[1]
    if command not in COMMANDS:
        print(
            f"medexp: error: unknown command {command!r}; expected one of {list(COMMANDS)}\n\n{USAGE}", file=sys.stderr
        )
        raise SystemExit(2)
    # Run the command's module as `python -m medexp.<command>` would: Lightning re-launches DDP
    # worker processes from __main__.__spec__, so they start the same command.
    arguments = sys.argv[2:]
    if "--verbose" in arguments:  # full tracebacks instead of one-line `medexp: error:` reports
        arguments.remove("--verbose")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if any(
        argument in ("-sc", "--shell-completion") or argument.startswith("--shell-completion=")
        for argument in arguments
    ):
        # Hydra's completion of one command's script would complete `python`, and its query
        # cannot parse `medexp <command>` lines
        print('medexp: error: tab completion covers every command: eval "$(medexp completion bash)"', file=sys.stderr)
        raise SystemExit(2)
    if arguments[:1] in (["--help"], ["-h"]) and (text := config_help(command, arguments[1:])) is not None:
        print(text)
        return
    sys.argv = [sys.argv[0], *arguments]
    runpy.run_module(COMMANDS[command][0], run_name="__main__", alter_sys=True)


def version() -> str:
    """``medexp <version> (torch ..., lightning ..., monai ..., python ...)``, read from the installed
    packages' metadata (nothing heavy is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from medexp import __version__

    libraries = []
    for name in ("torch", "lightning", "monai"):
        try:
            libraries.append(f"{name} {installed(name)}")
        except PackageNotFoundError:
            libraries.append(f"{name} not installed")
    return f"medexp {__version__} ({', '.join(libraries)}, python {platform.python_version()})"


def hydra_command(command: str) -> bool:
    """Whether ``command`` is a Hydra command (it has ``conf/<command>.yaml``)."""
    from importlib.resources import files

    return command in COMMANDS and files("medexp.conf").joinpath(f"{command}.yaml").is_file()


def config_help(command: str, overrides: list[str]) -> str | None:
    """``medexp <command> --help`` of a Hydra command: its config groups with their options, then
    its composed config, as Hydra's ``--help`` shows them.

    Hydra lists each group's options by rebuilding its whole config repository once per group
    (about 1 s for medexp's groups, and growing with each one); reading the packaged YAML files'
    names says the same in milliseconds. None where this cannot answer (not a Hydra command, or
    overrides that do not compose): Hydra's own help then runs and reports the problem.
    """
    from importlib.resources import files

    if not hydra_command(command):
        return None
    root = files("medexp.conf")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from hydra_plugins.medexp import register_plugins

    register_plugins()  # hparams_search=optuna names medexp's sweeper
    try:
        with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
            cfg = compose(config_name=command, overrides=overrides)
    except Exception:  # noqa: BLE001 - Hydra's help says what is wrong with the overrides
        return None
    groups: dict[str, list[str]] = {}

    def walk(folder, prefix: str) -> None:
        for child in sorted(folder.iterdir(), key=lambda entry: entry.name):
            if child.is_dir() and not child.name.startswith("__") and f"{prefix}{child.name}" != "hydra":
                options = sorted(
                    entry.name[: -len(".yaml")] for entry in child.iterdir() if entry.name.endswith(".yaml")
                )
                if options:
                    groups[f"{prefix}{child.name}"] = options
                walk(child, f"{prefix}{child.name}/")

    walk(root, "")
    listing = "\n".join(f"{group}: {', '.join(options)}" for group, options in groups.items())
    return (
        f"{command} is powered by Hydra.\n\n== Configuration groups ==\n"
        f"Compose your configuration from those groups (group=option)\n\n{listing}\n\n\n"
        f"== Config ==\nOverride anything in the config (foo.bar=value)\n\n{OmegaConf.to_yaml(cfg)}\n"
        "Powered by Hydra (https://hydra.cc)\nUse --hydra-help to view Hydra specific help\n"
    )

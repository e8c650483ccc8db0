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
    "export": ("medexp.export", "export a checkpoint to ONNX or TorchScript, verified against the model"),
    "sample": ("medexp.sample", "generate images with a GAN checkpoint (ckpt_path=... n=64 output=...)"),
    "reproduce": ("medexp.reproduce", "train a past run again from its recorded config and seed; compare metrics"),
    "summarize": ("medexp.summarize", "tabulate and plot the runs of a sweep (DIR [--metric NAME]); CV folds pooled"),
}

USAGE = "usage: medexp <command> [hydra overrides...]\n\ncommands:\n" + "\n".join(
    f"  {name:<11}{help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\n--verbose: full tracebacks on errors (as HYDRA_FULL_ERROR=1).\n`medexp <command> --help` lists the config groups and options (summarize: its arguments)."


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return
    command = sys.argv[1]
    if command not in COMMANDS:
        print(f"medexp: error: unknown command {command!r}; expected one of {list(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    # Run the command's module as `python -m medexp.<command>` would: Lightning re-launches DDP
    # worker processes from __main__.__spec__, so they start the same command.
    arguments = sys.argv[2:]
    if "--verbose" in arguments:  # full tracebacks instead of one-line `medexp: error:` reports
        arguments.remove("--verbose")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *arguments]
    runpy.run_module(COMMANDS[command][0], run_name="__main__", alter_sys=True)

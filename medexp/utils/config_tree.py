"""The composed config as a tree at the start of a run (lightning-hydra-template's
``extras.print_config``): one branch per top-level key, the config groups first, each as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the config groups, in the order of train.yaml's defaults list; the other keys follow in config order
GROUPS = ("data", "model", "optimizer", "scheduler", "callbacks", "logger", "trainer", "privacy", "paths", "extras")
TREE_FILE = "config_tree.log"


def config_tree(config: dict[str, Any]) -> Any:
    """A ``rich`` tree of ``config`` (resolved, plain containers)."""
    import yaml
    from rich.syntax import Syntax
    from rich.tree import Tree

    order = [key for key in GROUPS if key in config]
    order += [key for key in config if key not in order]
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    for key in order:
        value = config[key]
        text = (
            yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=2**31)
            if isinstance(value, dict)
            else str(value)
        )
        # highlighted text rather than a Syntax panel: no padding to the console's width, long lines wrap
        syntax = Syntax(text, "yaml", theme="ansi_dark", background_color="default", word_wrap=True)
        yaml_text = syntax.highlight(text.rstrip("\n"))
        yaml_text.rstrip()
        yaml_text.overflow = "fold"  # a long path breaks onto the next line, not cut off
        tree.add(key, style="dim", guide_style="dim").add(yaml_text)
    return tree


def print_config_tree(config: dict[str, Any], save_dir: Path | None = None) -> None:
    """Print ``config`` as a tree to the console and save it as ``save_dir/config_tree.log``;
    rank 0 only (DDP worker processes print nothing)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from rich.console import Console

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    tree = config_tree(config)
    Console().print(tree)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        with (save_dir / TREE_FILE).open("w") as file:
            Console(file=file, width=120, color_system=None).print(tree)

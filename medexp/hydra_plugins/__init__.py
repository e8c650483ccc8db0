"""Hydra plugins of medexp, installed as the package ``hydra_plugins.medexp``.

Hydra only loads plugins from the ``hydra_plugins`` namespace, so ``pyproject.toml`` maps this
folder there; import them as ``hydra_plugins.medexp.<module>``.
"""


def register_plugins() -> None:
    """Register medexp's plugins with Hydra.

    Hydra finds plugins by scanning the ``hydra_plugins`` namespace, which misses packages
    installed in editable mode (``pip install -e``); registering them by hand works either way.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.medexp.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)

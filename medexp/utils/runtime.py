"""Process-wide settings applied once the heavy libraries are imported."""

from __future__ import annotations

import logging
import warnings


def tidy_library_output() -> None:
    """Send Lightning's log records through Hydra's handlers only, and drop known noise."""
    # lightning/__init__ attaches its own console handler although records also reach the root
    # logger, which Hydra already writes to the console and the run's log file: lines came twice.
    logging.getLogger("lightning").handlers.clear()
    # torch >= 2.10 deprecates a pytree API that Lightning 2.6 still calls on every batch
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    # HD95 treats empty masks explicitly (see medexp.tasks.segmentation.HausdorffDistance95)
    warnings.filterwarnings(
        "ignore", message=r"the (prediction|ground truth) of class \d+ is all 0", category=UserWarning
    )
    # MONAI 1.5+ deprecates an argument its own Hausdorff distance still passes
    warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
    # with pydicom installed, MONAI logs that the optional GPU decoder is missing for every loader
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

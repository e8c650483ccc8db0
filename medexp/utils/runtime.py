"""Process-wide settings applied once the heavy libraries are imported."""

from __future__ import annotations

import logging
import re
import warnings

# Lightning's INFO lines that tell a medexp user nothing on every run: an advertisement, device
# inventories (the device is in the config), the rank-0 seed (in the config tree and
# run_info.json), the GPU each process sees. Its warnings, and any other line, still come
# through; so do the lines of DDP runs that say which process joined with which seed
# ("Initializing distributed: GLOBAL_RANK ...", "[rank: 1] Seed set to ...").
NOISE = re.compile(
    "|".join(
        [
            r"💡 Tip: ",  # "For seamless cloud logging ... litlogger"
            r"^(GPU|TPU|HPU|IPU) available: ",
            r"^(\[rank: 0\] )?Seed set to \d+",
            r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
            r"^Trainer already configured with model summary callbacks",
            r"^Restoring states from the checkpoint path at ",  # "Loaded model weights from ..." follows
        ]
    )
)
# where Lightning logs those lines from (a logger's filters see only its own records)
NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.accelerators.cuda",
)


class DropNoise(logging.Filter):
    """Drops the records whose message matches :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the handler's business, not ours
            return True
        return NOISE.search(message) is None


def tidy_library_output() -> None:
    """Send Lightning's log records through Hydra's handlers only, and drop known noise."""
    # lightning/__init__ attaches its own console handler although records also reach the root
    # logger, which Hydra already writes to the console and the run's log file: lines came twice.
    logging.getLogger("lightning").handlers.clear()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
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

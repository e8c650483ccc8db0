"""In-memory caches of loaded cases (``data.cache=memory``): filled at setup, with progress."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from monai.data import CacheDataset

log = logging.getLogger(__name__)


def memory_cache(items: Sequence[Any], transform: Any, what: str) -> CacheDataset:
    """MONAI's ``CacheDataset`` of ``items``, filled now: a progress bar (tqdm) when the console is
    interactive, and in any case a log line when it starts and one when it ends, with the count
    and the time taken (a large cache fills for minutes).

    Args:
        what: what is cached, for the log (e.g. ``train cases``).
    """
    log.info("caching %d %s in memory ...", len(items), what)
    start = time.perf_counter()
    dataset = CacheDataset(items, transform, progress=_interactive())
    log.info("cached %d %s in %.1f s", len(dataset), what, time.perf_counter() - start)
    return dataset


def _interactive() -> bool:
    """Whether a progress bar would be seen: tqdm draws on stderr."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False

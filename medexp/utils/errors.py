"""One-line reporting of user errors (bad config, bad data) instead of library tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger("medexp")


class MedexpError(Exception):
    """A problem with the user's config or data; reported in one line, without a traceback."""


def user_error_message(exc: BaseException) -> str | None:
    """The message to show for ``exc`` if it (or what caused it) is a user error."""
    from hydra.errors import InstantiationException

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MedexpError):
            return str(current)
        current = current.__cause__ or current.__context__
    if isinstance(exc, InstantiationException):
        # Hydra's own message already names the target, the argument and the config key.
        return str(exc)
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into ``medexp: error: ...`` and exit code 1.

    Set ``HYDRA_FULL_ERROR=1`` to see the full traceback instead.
    """
    try:
        yield
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("user error", exc_info=True)
        print(f"medexp: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None

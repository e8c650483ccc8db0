"""One-line reporting of user errors (bad config, bad data) instead of library tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger("medexp")


class MedexpError(Exception):
    """A problem with the user's config or data; reported in one line, without a traceback.

    Subclasses may change how :func:`user_errors` reports them: ``kind`` (the word after
    ``medexp:``), ``exit_code``, and ``ends_sweep`` (False: in a multirun, only this job fails
    and the sweep goes on, e.g. a training loss that diverged for one learning rate).
    """

    kind = "error"
    exit_code = 1
    ends_sweep = True


def find_user_error(exc: BaseException) -> MedexpError | None:
    """``exc``, or the exception that caused it, if that is a :class:`MedexpError`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MedexpError):
            return current
        current = current.__cause__ or current.__context__
    return None


def user_error_message(exc: BaseException) -> str | None:
    """The message to show for ``exc`` if it (or what caused it) is a user error."""
    from hydra.errors import InstantiationException

    if (error := find_user_error(exc)) is not None:
        return str(error)
    if isinstance(exc, InstantiationException):
        # Hydra's own message already names the target, the argument and the config key.
        return str(exc)
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into ``medexp: error: ...`` and exit code 1
    (or the error's own ``kind`` and ``exit_code``, see :class:`MedexpError`).

    Set ``HYDRA_FULL_ERROR=1`` to see the full traceback instead.
    """
    try:
        yield
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("user error", exc_info=True)
        error = find_user_error(exc) or MedexpError()
        print(f"medexp: {error.kind}: {message}", file=sys.stderr)
        if not error.ends_sweep and _in_multirun():
            raise  # Hydra records the job as failed; the sweep goes on
        raise SystemExit(error.exit_code) from None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

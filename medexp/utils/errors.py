"""One-line reporting of user errors (bad config, bad data) instead of library tracebacks."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

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


# True inside raise_user_errors(): user errors reach the Python caller as exceptions
_RAISING = contextvars.ContextVar("medexp_raise_user_errors", default=False)


class RaisedUserError(SystemExit):
    """What :func:`user_errors` raises inside :func:`raise_user_errors`: an exit, as the command's
    (it passes through code that catches ``Exception``, as Hydra's callbacks do), that carries
    the user error (``error``) to the Python caller instead of printing it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(1)
        self.error = error


@contextlib.contextmanager
def raise_user_errors() -> Iterator[None]:
    """Inside this block :func:`user_errors` raises :class:`RaisedUserError` instead of printing
    the error and exiting: medexp's Python API (:mod:`medexp.api`) raises the error to its caller."""
    token = _RAISING.set(True)
    try:
        yield
    finally:
        _RAISING.reset(token)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into ``medexp: error: ...`` and exit code 1
    (or the error's own ``kind`` and ``exit_code``, see :class:`MedexpError`).

    Set ``HYDRA_FULL_ERROR=1`` to see the full traceback instead; inside
    :func:`raise_user_errors` they come out in a :class:`RaisedUserError`.
    """
    try:
        yield
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _RAISING.get():
            raise RaisedUserError(exc) from exc
        log.debug("user error", exc_info=True)
        error = find_user_error(exc) or MedexpError()
        print(f"medexp: {error.kind}: {message}", file=sys.stderr)
        if not error.ends_sweep and _in_multirun():
            raise  # Hydra records the job as failed; the sweep goes on
        raise SystemExit(error.exit_code) from None


def config_file_error(exc: BaseException) -> str | None:
    """A YAML syntax error in a config file (``exc`` or what caused it), in one line: the file,
    the line and column, and what the parser expected; None for any other exception."""
    import yaml

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and not isinstance(current, yaml.MarkedYAMLError):
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    if not isinstance(current, yaml.MarkedYAMLError) or (current.problem_mark or current.context_mark) is None:
        return None
    mark, context = current.problem_mark or current.context_mark, ""
    if current.context and current.context_mark is not None and current.context_mark is not mark:
        context = f" ({current.context} that starts at line {current.context_mark.line + 1}, column {current.context_mark.column + 1})"
    elif current.context:
        context = f" ({current.context})"
    problem = current.problem or current.context or "invalid YAML"
    return f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}{context}"


def report_config_files_briefly() -> None:
    """Make Hydra report a YAML syntax error in a config file (e.g. in a user's ``--config-dir``)
    as ``medexp: error: <file>, line <n>, ...`` and exit code 1. Such an error happens while
    Hydra composes the config, before any medexp code runs, and Hydra prints the parser's whole
    traceback (about 95 lines). Wraps ``hydra._internal.utils.run_and_report``, through which
    ``@hydra.main`` composes and runs every command; its other reports are unchanged, and
    ``HYDRA_FULL_ERROR=1`` (``--verbose``) still shows the traceback. Idempotent."""
    from hydra._internal import utils as hydra_utils

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "reports_config_files", False):
        return  # a Hydra without it: its own report stands

    def run_and_report(func: Any) -> Any:  # Hydra's signature
        def reported() -> Any:
            try:
                return func()
            except Exception as exc:
                message = config_file_error(exc)
                if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"medexp: error: {message}", file=sys.stderr)
                raise SystemExit(1) from None

        return original(reported)

    run_and_report.reports_config_files = True
    hydra_utils.run_and_report = run_and_report


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

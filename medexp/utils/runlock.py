"""A run directory belongs to one run at a time, and must be writable before anything is written.

Hydra writes into the run directory (``.hydra/``, the log file) before medexp's code runs: an
unwritable directory fails inside Hydra's logging set-up ("Unable to configure handler 'file'"),
and a second run in the same ``hydra.run.dir`` would overwrite the first's ``.hydra/`` record. So
both checks are a Hydra callback (:class:`RunDirGuard`, in ``conf/hydra/default.yaml``) that runs
before Hydra writes there. Kept free of torch/lightning imports: it runs before anything heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.preflight import check_writable

log = logging.getLogger("medexp")

LOCK_NAME = ".lock"
# the rank of a process that joins a run another process started: Lightning's DDP launcher sets
# LOCAL_RANK (and NODE_RANK) for its workers; torchrun sets RANK, SLURM SLURM_PROCID
_RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_worker_process() -> bool:
    """True in a process of rank > 0: it works in the run directory of the rank-0 process."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in _RANK_ENV)


class RunDirLock:
    """``<run>/.lock``, held with ``flock`` while the run lasts and removed when it ends.

    The file names its holder (PID, host, start time) for the message a second run shows. The
    kernel releases the lock when its process dies, even by SIGKILL: a file left behind that
    nobody holds is taken over with a warning. A lock file naming another host is refused (on a
    shared filesystem, this host cannot tell whether that run still lives).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.pid = os.getpid()

    def acquire(self) -> None:
        """Raises:
        MedexpError: another run holds the directory, naming its PID and host.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise MedexpError(
                        f"{self.run_dir} is in use by another run ({_describe(holder)}); wait for it "
                        "to end, or give this run another directory (hydra.run.dir=...)"
                    ) from None
                log.warning(
                    "cannot lock %s (%s): nothing stops another run from using it at the same time",
                    self.path,
                    exc.strerror or exc,
                )
                return
            # its holder may have ended and removed the file between our open and flock
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        holder = _read(fd)
        if holder and holder.get("host") != socket.gethostname():
            os.close(fd)
            raise MedexpError(
                f"{self.run_dir} is locked by a run on another host ({_describe(holder)}); if that run "
                f"has ended, delete {self.path}, or give this run another directory (hydra.run.dir=...)"
            )
        if holder:
            log.warning(
                "%s: taking over the lock left by %s, which no process holds any more (that run ended "
                "without releasing it, or the directory was copied)",
                self.run_dir,
                _describe(holder),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the file and let go (only in the process that took it, not a forked child)."""
        if self.fd is None or os.getpid() != self.pid:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "unknown PID and host"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class RunDirGuard(Callback):
    """Hydra callback: before Hydra writes into a run's directory, check that it is writable and
    lock it for this run (multirun: each job's directory, as the job starts). Processes of rank
    > 0 (DDP workers) join the run of the rank-0 process, in its directory: they do neither.

    Args:
        lock: take ``<run>/.lock`` (False: only the writability check).
    """

    def __init__(self, lock: bool = True) -> None:
        self.lock = lock
        self.held: RunDirLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config, "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_worker_process() and (sweep_dir := _select(config, "hydra.sweep.dir")):
            with user_errors():
                check_writable(Path(sweep_dir).absolute(), "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _multirun(config):
            self._start(config, "hydra.runtime.output_dir")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if _multirun(config):
            self._end()

    def _start(self, config: DictConfig, key: str) -> None:
        run_dir = _select(config, key)
        if run_dir is None or is_worker_process():
            return  # an unresolvable directory: Hydra reports it
        with user_errors():
            check_writable(Path(run_dir).absolute(), "hydra.run.dir" if key == "hydra.run.dir" else "hydra.sweep.dir")
            if self.lock:
                self.held = RunDirLock(run_dir)
                self.held.acquire()

    def _end(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


def _multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _select(config: DictConfig, key: str) -> str | None:
    try:
        value = OmegaConf.select(config, key)
    except Exception:  # noqa: BLE001 - an interpolation that fails here fails in Hydra too, with its own message
        return None
    return str(value) if value else None

"""Hydra multirun jobs that Lightning's DDP worker processes can join: one directory per run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

# set in os.environ by Lightning's _SubprocessScriptLauncher when it starts the workers
_DDP_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_command_line() -> list[str]:
    """This Hydra job's own overrides, as a single run's command line (``sys.argv[1:]``)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides
    # hydra.mode=MULTIRUN is what `-m` adds; launcher and sweep settings do nothing in a single run
    return [*(o for o in overrides.hydra if not o.startswith("hydra.mode=")), *overrides.task]


@contextlib.contextmanager
def ddp_workers_join_this_job(module: str) -> Iterator[None]:
    """Within a multirun job, make DDP workers run this job, in its directory; tidy up after.

    Lightning's ``strategy=ddp`` starts ranks > 0 by running ``python -m <__main__'s module>``
    with ``sys.argv[1:]`` plus ``hydra.run.dir=<hydra.run.dir>``. In a multirun that command is
    the whole sweep (``-m seed=1,2``) and ``hydra.run.dir`` the single-run directory, so each
    worker ran a sweep of its own in a new timestamped directory and met rank 0 only by chance;
    under submitit, ``__main__`` is submitit's worker, which cannot run a medexp command. For
    the duration of the job the command becomes ``python -m <module> <this job's overrides>``
    and ``hydra.run.dir`` the job's directory (``run_job`` gives every job a fresh Hydra config,
    so nothing leaks to the next). Afterwards the DDP variables Lightning left in ``os.environ``
    are restored (``LOCAL_RANK`` would make the next job's Trainer wait for workers nobody
    starts) and the process group is closed (the next job would reuse it, with workers that
    have exited). Single runs are left alone: Lightning handles them.

    Args:
        module: the entry point the job belongs to, e.g. ``medexp.train``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    main = sys.modules["__main__"]
    argv, spec = sys.argv, getattr(main, "__spec__", None)
    env = {name: os.environ.get(name) for name in _DDP_ENV}
    sys.argv = [argv[0], *job_command_line()]
    main.__spec__ = importlib.util.find_spec(module)
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv, main.__spec__ = argv, spec
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

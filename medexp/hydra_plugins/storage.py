"""Where an Optuna study lives: ``hydra.sweeper.storage``, checked before any job starts.

One URL names the storage, for the sweeper, for every job's pruning callback and for
``medexp summarize``:

- ``journal:///<file>`` (the default, ``<sweep dir>/optuna.journal``): Optuna's append-only
  journal file (``JournalFileBackend``). Safe for jobs side by side and for jobs of a SLURM array
  on a shared filesystem (NFS, Lustre), as it locks with a symlink, which those filesystems honour;
- ``sqlite:///<file>``: one machine, a few jobs at once (SQLite's locks are unreliable over NFS);
- ``postgresql://user:password@host:port/db`` or ``mysql://...``: a database server, for many
  nodes and many trials. ``postgresql://`` uses psycopg (3) when psycopg2 is not installed.

As with ``sqlite:///``, the path after ``journal:///`` is relative to the working directory
unless it starts with ``/`` (``journal:////abs/path``). Passwords are never shown: messages and
``optimization_results.yaml`` name the URL with its password removed (libpq reads it from
``PGPASSWORD`` or ``~/.pgpass`` when a URL has none).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from medexp.utils.errors import MedexpError

JOURNAL = "journal:///"
SQLITE = "sqlite:///"
SERVERS = ("postgresql", "mysql")
CHOICES = "journal:///<file>, sqlite:///<file>, postgresql://user:password@host:port/db or mysql://..."
# which module each database's default SQLAlchemy driver is, and how to install it
_DRIVERS = {
    "postgresql": ("psycopg2", "pip install 'psycopg[binary]' (and write postgresql+psycopg://) or psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "pip install 'psycopg[binary]'"),
    "postgresql+psycopg2": ("psycopg2", "pip install psycopg2-binary"),
    "mysql": ("MySQLdb", "pip install mysqlclient (or write mysql+pymysql:// after pip install pymysql)"),
    "mysql+pymysql": ("pymysql", "pip install pymysql"),
}


def masked(url: str) -> str:
    """``url`` without its password (``postgresql://me@host/db``), fit for logs and files."""
    if not url.startswith(SERVERS):
        return url
    try:
        from sqlalchemy.engine import URL, make_url

        parsed = make_url(url)
    except Exception:  # unparsable: show only the scheme
        return url.split("://", 1)[0] + "://<unparsable URL>"
    # (URL.set(password=None) would keep it: None there means "unchanged")
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return bare.render_as_string(hide_password=False)


def driver_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgresql://`` means psycopg2 to SQLAlchemy;
    with only psycopg (3) installed it becomes ``postgresql+psycopg://``."""
    if url.startswith("postgresql://") and not _installed("psycopg2") and _installed("psycopg"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:///`` URL; None for other storages."""
    return Path(url[len(JOURNAL) :]) if url.startswith(JOURNAL) else None


def open_storage(url: str) -> Any:
    """The Optuna storage ``url`` names (see the module docstring)."""
    import optuna

    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(driver_url(url))


def check_storage(url: Any, key: str = "hydra.sweeper.storage") -> None:
    """Fail now, in one line naming ``key``, the URL (no password) and what is missing, rather
    than in every job: an unknown scheme, a folder that cannot be written, a database driver that
    is not installed, a server that does not answer, refused credentials, a missing database.

    Raises:
        MedexpError: as above.
    """
    if not isinstance(url, str) or not url:
        raise MedexpError(f"{key}={url!r}; expected one of {CHOICES}")
    where = f"{key}={masked(url)}"
    for prefix in (JOURNAL, SQLITE):
        if url.startswith(prefix):
            path = Path(url[len(prefix) :])
            if not path.name or path.name == ":memory:":
                raise MedexpError(f"{where}: a study shared by jobs needs a file, e.g. {prefix}<sweep dir>/optuna")
            _check_folder(path.parent, where)
            return
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in SERVERS:
        raise MedexpError(f"{where}: unknown storage {scheme or url!r}; expected one of {CHOICES}")
    _check_server(driver_url(url), where)


def _check_folder(folder: Path, where: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedexpError(f"{where}: cannot create the folder {folder} ({exc.strerror})") from None
    import os

    if not os.access(folder, os.W_OK):
        raise MedexpError(f"{where}: the folder {folder} is not writable")


def _check_server(url: str, where: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise MedexpError(f"{where}: not a database URL; expected one of {CHOICES}") from None
    module, install = _DRIVERS.get(parsed.drivername, (None, ""))
    if module and not _installed(module):
        raise MedexpError(f"{where}: the database driver {module!r} is not installed; {install}")
    try:
        engine = create_engine(parsed, connect_args={"connect_timeout": 10})
    except (NoSuchModuleError, ImportError) as exc:
        raise MedexpError(f"{where}: no database driver for {parsed.drivername!r} ({exc})") from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise MedexpError(f"{where}: {_connection_problem(str(exc.orig), parsed)}") from None
    finally:
        engine.dispose()


def _connection_problem(message: str, url: Any) -> str:
    """What a failed connection says, in words: the server, the credentials or the database."""
    first = " ".join(message.split())
    lowered = first.lower()
    server = f"{url.host or 'localhost'}:{url.port or 'default port'}"
    if "password authentication failed" in lowered or "access denied" in lowered or "no password supplied" in lowered:
        return f"the server at {server} refused the credentials of user {url.username!r} ({first})"
    if "does not exist" in lowered and "database" in lowered or "unknown database" in lowered:
        return f"the server at {server} has no database {url.database!r}; create it first ({first})"
    if any(
        word in lowered
        for word in ("connection refused", "could not connect", "timeout", "timed out", "can't connect", "resolve")
    ):
        return f"no database server answers at {server} ({first})"
    return f"cannot connect to {server} ({first})"


def load_stored_study(url: str, study_name: str) -> Any:
    """A stored study (``optuna.Study``), to read.

    Raises:
        MedexpError: when the storage holds no study of that name (with the names it holds).
    """
    import optuna

    check_storage(url, "storage")
    storage = open_storage(url)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        raise MedexpError(f"storage {masked(url)} holds no study {study_name!r}; it holds {sorted(names)}")
    return optuna.load_study(study_name=study_name, storage=storage)

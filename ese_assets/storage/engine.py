"""Database engines for the products database: SQLite (default, a file) or PostgreSQL (scale).

``make_engine`` accepts either an SQLAlchemy URL (anything containing ``://``) or a filesystem path,
which means an SQLite file. Engines are cached per (URL, process id): every asset, sensor tick and
API call in one process reuses one connection pool, and a forked worker builds its own pool instead
of sharing sockets or file handles with its parent (SQLAlchemy: "Using Connection Pools with
Multiprocessing or os.fork()").

SQLite settings, applied on every new DBAPI connection:

* ``journal_mode=WAL``: readers never block the writer and the writer never blocks readers, so the
  Dagster UI, the API and a running pipeline can share one file (https://sqlite.org/wal.html).
* ``busy_timeout``: a writer that finds the database locked waits (30 s by default, environment
  variable ``ESE_DB_BUSY_TIMEOUT_S``) instead of failing at once with "database is locked".
* ``foreign_keys=ON``: SQLite does not enforce foreign keys unless asked, per connection.
* ``synchronous=NORMAL``: durable across application crashes in WAL mode; only a power loss can
  roll back the last transactions, never corrupt the file (https://sqlite.org/pragma.html#pragma_synchronous).

SQLAlchemy takes over BEGIN from the ``sqlite3`` driver (the documented recipe in SQLAlchemy's
"Transactions with SQLite and the sqlite3 driver"): the driver's legacy mode does not BEGIN before
SELECT, so a read-then-write unit would not be one transaction. Write units started with
:func:`begin_write` emit ``BEGIN IMMEDIATE``, which takes the write lock up front: a deferred
transaction that reads first and then writes cannot wait for the lock (SQLite returns SQLITE_BUSY
at once to avoid a deadlock, whatever the busy timeout), an immediate one simply waits its turn.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import weakref
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from ese_assets.storage.errors import DatabaseUnavailable, describe, is_transient
from ese_assets.storage.schema import metadata

#: Environment variable: SQLite busy timeout in seconds (float).
BUSY_TIMEOUT_ENV = "ESE_DB_BUSY_TIMEOUT_S"
DEFAULT_BUSY_TIMEOUT_S = 30.0

# Execution option that marks a connection as a write unit of work (BEGIN IMMEDIATE on SQLite).
_WRITE_OPTION = "ese_write"
# Arbitrary constant key of the PostgreSQL advisory lock that serialises concurrent ensure_schema.
_SCHEMA_LOCK_KEY = 0x45534553  # "ESES"

_engines: dict[tuple[str, int], Engine] = {}
_engines_lock = threading.Lock()
# Engines whose schema this process has checked (ensure_schema runs once per engine; a disposed
# engine is forgotten, so a database re-created under the same URL is checked again).
_schema_checked: weakref.WeakSet[Engine] = weakref.WeakSet()


def _busy_timeout_ms() -> int:
    raw = os.environ.get(BUSY_TIMEOUT_ENV, "").strip()
    seconds = DEFAULT_BUSY_TIMEOUT_S
    if raw:
        try:
            seconds = float(raw)
        except ValueError as exc:
            raise ValueError(f"{BUSY_TIMEOUT_ENV}={raw!r} is not a number of seconds") from exc
        if seconds < 0:
            raise ValueError(f"{BUSY_TIMEOUT_ENV}={raw!r} must be >= 0")
    return round(seconds * 1000.0)


def normalize_url(url_or_path: str | os.PathLike[str]) -> str:
    """Return the SQLAlchemy URL string for ``url_or_path``.

    A value containing ``://`` is already a URL; anything else is a filesystem path to an SQLite
    file, made absolute after ``~`` expansion (so the URL does not depend on the working directory).
    """
    text = os.fspath(url_or_path).strip()
    if not text:
        raise ValueError("empty database URL or path")
    if "://" in text:
        return text
    path = os.path.abspath(os.path.expanduser(text))
    return f"sqlite:///{path}"


def _sqlite_file(url: URL) -> str | None:
    """Filesystem path of a file-backed SQLite URL, None for in-memory databases."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return database


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record) -> None:
        # SQLAlchemy emits BEGIN itself (see module docstring); the driver must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _raise_transient_as_unavailable(engine: Engine) -> None:
    """Every transient driver error of ``engine`` surfaces as :class:`DatabaseUnavailable`.

    SQLAlchemy's ``handle_error`` hook sees errors of statements, commits and new connections
    alike, after its own clean-up (a dead connection is still invalidated and replaced), so no
    call site can forget the translation.
    """

    @event.listens_for(engine, "handle_error")
    def _on_error(context: sa.engine.ExceptionContext) -> None:
        error = context.sqlalchemy_exception
        if error is not None and is_transient(error):
            raise DatabaseUnavailable(f"database unavailable: {describe(error)}") from error


def make_engine(url_or_path: str | os.PathLike[str]) -> Engine:
    """Return the (cached) engine for a database URL or an SQLite file path.

    * ``"postgresql://user@host/db"`` (SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3) or
      ``"postgresql+psycopg://..."``: PostgreSQL with ``pool_pre_ping`` so connections dropped by a
      server restart or a firewall are replaced transparently.
    * ``"/data/products.sqlite3"``, ``"~/ese.db"`` or ``"sqlite:///..."``: SQLite file; parent
      directories are created; WAL, busy timeout, foreign keys and synchronous=NORMAL are set on
      every connection (see module docstring).

    Engines are cached per (URL, process id); call :func:`dispose_engines` to drop the cache.
    """
    url_text = normalize_url(url_or_path)
    key = (url_text, os.getpid())
    with _engines_lock:
        cached = _engines.get(key)
        if cached is not None:
            return cached
        url = make_url(url_text)
        backend = url.get_backend_name()
        if backend == "sqlite":
            path = _sqlite_file(url)
            if path is not None:
                os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            engine = sa.create_engine(url)
            _configure_sqlite(engine, _busy_timeout_ms())
        elif backend == "postgresql":
            engine = sa.create_engine(url, pool_pre_ping=True)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
        _raise_transient_as_unavailable(engine)
        _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Dispose and forget every engine this process created (tests, or before exit)."""
    with _engines_lock:
        pid = os.getpid()
        for (_, engine_pid), engine in list(_engines.items()):
            if engine_pid == pid:
                engine.dispose()
            else:
                # Inherited through fork: never close the parent's connections from the child.
                engine.dispose(close=False)
        _engines.clear()


def dispose_engine(url_or_path: str | os.PathLike[str]) -> None:
    """Dispose and forget the cached engine of one URL or path in this process, if any."""
    key = (normalize_url(url_or_path), os.getpid())
    with _engines_lock:
        engine = _engines.pop(key, None)
    if engine is not None:
        engine.dispose()


@contextlib.contextmanager
def begin_write(engine: Engine) -> Iterator[Connection]:
    """One write transaction (unit of work): commit on success, roll back on any exception.

    On SQLite the transaction starts with ``BEGIN IMMEDIATE`` (waits up to the busy timeout for the
    write lock, then holds it); on PostgreSQL it is an ordinary READ COMMITTED transaction.
    """
    with engine.execution_options(**{_WRITE_OPTION: True}).begin() as conn:
        yield conn


def _missing_schema(conn: Connection) -> tuple[bool, dict[str, list[sa.Column]]]:
    """(some table or index is missing, {existing table: columns it lacks})."""
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())
    missing_table = any(t.name not in existing for t in metadata.sorted_tables)
    missing_columns: dict[str, list[sa.Column]] = {}
    for table in metadata.sorted_tables:
        if table.name not in existing:
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        lacking = [c for c in table.columns if c.name not in have]
        if lacking:
            missing_columns[table.name] = lacking
        have_indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        if any(i.name not in have_indexes for i in table.indexes):
            missing_table = True
    return missing_table, missing_columns


def _add_columns(conn: Connection, table: str, columns: list[sa.Column]) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for columns added to the schema since the file was made.

    Only columns that are nullable or have a server default can be added to a table with rows;
    every column this project adds is one of those.
    """
    preparer = conn.dialect.identifier_preparer
    for column in columns:
        ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {preparer.quote(table)} ADD COLUMN {ddl}"))


def ensure_schema(engine: Engine) -> None:
    """Create missing tables, indexes and added columns; idempotent, once per process and URL.

    The check is a read (no write lock): only a database that lacks something takes the write
    lock, so readers such as the API never wait for a writer. Concurrent creators are serialised
    (SQLite write lock; a PostgreSQL transaction-scoped advisory lock) and re-check under it.
    """
    if engine in _schema_checked:
        return
    with engine.connect() as conn:
        missing_table, missing_columns = _missing_schema(conn)
    if missing_table or missing_columns:
        with begin_write(engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                )
            _, missing_columns = _missing_schema(conn)
            for table, columns in missing_columns.items():
                _add_columns(conn, table, columns)
            metadata.create_all(conn, checkfirst=True)  # new tables with their indexes
            for table in metadata.sorted_tables:  # indexes added to tables that existed
                for index in table.indexes:
                    index.create(conn, checkfirst=True)
    _schema_checked.add(engine)


def open_existing(url_or_path: str | os.PathLike[str]) -> Engine:
    """The engine of a products database that must exist already (read commands: nothing is
    created). A missing SQLite file, or a database without the pipeline's tables, raises
    FileNotFoundError naming it, a file that is no database ValueError; otherwise
    :func:`ensure_schema` adds what a newer version added.
    """
    url = normalize_url(url_or_path)
    path = _sqlite_file(make_url(url)) if make_url(url).get_backend_name() == "sqlite" else None
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"products database {path} does not exist")
    engine, shown = make_engine(url), path or describe_url(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("images"):
                raise FileNotFoundError(f"products database {shown} has no pipeline tables")
    except sa.exc.DatabaseError as exc:  # e.g. a file that is not SQLite
        dispose_engine(url)
        raise ValueError(f"{shown} is not a products database ({exc.orig})") from None
    ensure_schema(engine)
    return engine


_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@")


def describe_url(url: str | URL | os.PathLike[str]) -> str:
    """URL or path for logs, with any password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    text = os.fspath(url)
    if "://" not in text:
        return text
    try:
        return make_url(text).render_as_string(hide_password=True)
    except Exception:  # unparsable URL: still never print a password
        return _PASSWORD_RE.sub(r"\1***@", text)

"""One error type for "the database is busy or unavailable right now".

Every storage call that fails for a reason that goes away by itself (an SQLite lock held past the
busy timeout, a full disk, a PostgreSQL connection that was terminated, a serialization failure or
deadlock, a server restarting) is raised as :class:`DatabaseUnavailable`. Callers treat it as
*transient*: the per-image error boundary lets it through instead of marking the image failed, the
Dagster assets retry the step with backoff, and the CLI prints one line and exits non-zero. Every
other database error is a bug or a configuration problem and keeps its own type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

#: SQLite messages (lower case) of conditions that clear up without a code change.
SQLITE_TRANSIENT_MESSAGES = (
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "disk is full",
    "disk i/o error",
    "unable to open database file",
)

#: PostgreSQL SQLSTATE codes (or their two-character classes) of transient conditions:
#: 08 connection exceptions, 40001 serialization failure, 40P01 deadlock, 53 insufficient
#: resources (disk full, too many connections), 55P03 lock not available, 57P01-57P03 the server
#: shutting down or starting.
POSTGRES_TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "53", "55P03", "57P01", "57P02", "57P03")

#: Messages of a connection that died without an SQLSTATE (psycopg, libpq).
CONNECTION_LOST_MESSAGES = (
    "server closed the connection",
    "connection is closed",
    "terminating connection",
    "connection refused",
    "could not connect",
    "connection failed",
    "consuming input failed",
    "ssl connection has been closed",
)


class DatabaseUnavailable(RuntimeError):
    """The products database is busy or unreachable; the same operation may succeed later."""


def _sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "diag", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_transient(error: BaseException) -> bool:
    """True for database errors that are expected to clear up by themselves (see module doc)."""
    if isinstance(error, DatabaseUnavailable | sa_exc.TimeoutError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    code = _sqlstate(error)
    if code is not None:
        return any(code.startswith(prefix) for prefix in POSTGRES_TRANSIENT_SQLSTATES)
    message = str(getattr(error, "orig", error)).lower()
    return any(m in message for m in SQLITE_TRANSIENT_MESSAGES + CONNECTION_LOST_MESSAGES)


def describe(error: BaseException) -> str:
    """One line: the driver's message without SQLAlchemy's statement and parameter dump."""
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextlib.contextmanager
def translate_transient() -> Iterator[None]:
    """Re-raise transient database errors as :class:`DatabaseUnavailable` (the cause is kept)."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except (sa_exc.DBAPIError, sa_exc.TimeoutError) as exc:
        if is_transient(exc):
            raise DatabaseUnavailable(f"database unavailable: {describe(exc)}") from exc
        raise

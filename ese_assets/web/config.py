"""The web server's configuration: where it listens, the write token, which database it serves.

Variables (README "Web app and REST API"): ``WEB_HOST`` (default 127.0.0.1), ``WEB_PORT`` (8000,
the port of the seed guide's ``curl`` examples), ``ESE_WEB_TOKEN`` (required for writes when the
server listens on anything but the loopback interface), plus the pipeline's own
``PIPELINE_PRODUCTS_DB`` and ``DAGSTER_HOME``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from ese_assets.storage.engine import describe_url, normalize_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
HOST_ENV = "WEB_HOST"
PORT_ENV = "WEB_PORT"
TOKEN_ENV = "ESE_WEB_TOKEN"
#: Shortest accepted token: a guessable token on an exposed port is no protection.
MIN_TOKEN_LENGTH = 16


class WebConfigError(ValueError):
    """A configuration the server refuses to start with (one line saying what to do)."""


class MissingDatabase(WebConfigError):
    """The SQLite products database does not exist (yet): it is never created by reading."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _port(raw: str | int) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise WebConfigError(f"{PORT_ENV}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise WebConfigError(f"{PORT_ENV}={port} is not a port number (1-65535)")
    return port


def sqlite_file(products_db: str) -> Path | None:
    """The file of an SQLite products database (None for other backends)."""
    url = make_url(normalize_url(products_db))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


@dataclass(frozen=True)
class WebConfig:
    """Everything :func:`ese_assets.web.app.create_app` needs."""

    products_db: str  # SQLAlchemy URL or SQLite path (PIPELINE_PRODUCTS_DB)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None  # ESE_WEB_TOKEN: Bearer token for writes
    dagster_home: str | None = None  # instance where detection runs are recorded

    @property
    def token_required(self) -> bool:
        """Writes need the token whenever the server is reachable from other machines (and
        whenever a token is configured at all)."""
        return bool(self.token) or not is_loopback(self.host)

    def check(self) -> WebConfig:
        """Raise :class:`WebConfigError` for a configuration that must not serve."""
        if not is_loopback(self.host) and not self.token:
            raise WebConfigError(
                f"refusing to listen on {self.host}: writes (marking candidates, launching "
                f"detection) would be open to the network. Set {TOKEN_ENV} to a secret of at "
                f"least {MIN_TOKEN_LENGTH} characters (clients send 'Authorization: Bearer "
                f"<token>'), or listen on 127.0.0.1"
            )
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise WebConfigError(
                f"{TOKEN_ENV} is {len(self.token)} characters long; use at least "
                f"{MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(24))')"
            )
        db_file = sqlite_file(self.products_db)
        if db_file is not None and not db_file.is_file():
            raise MissingDatabase(
                f"products database {db_file} does not exist: run `make demo` first, or set "
                "PIPELINE_PRODUCTS_DB to your database (a path or postgresql:// URL)"
            )
        return self

    def describe(self) -> str:
        return describe_url(self.products_db)

    @classmethod
    def from_env(
        cls,
        *,
        products_db: str,
        host: str | None = None,
        port: int | str | None = None,
    ) -> WebConfig:
        """Arguments win over ``WEB_HOST``/``WEB_PORT``; the token only comes from the
        environment (a token on a command line is visible to every user of the machine)."""
        env_host = os.environ.get(HOST_ENV, "").strip()
        env_port = os.environ.get(PORT_ENV, "").strip()
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        home = os.environ.get("DAGSTER_HOME", "").strip() or None
        return cls(
            products_db=products_db,
            host=host or env_host or DEFAULT_HOST,
            port=_port(port if port is not None else (env_port or DEFAULT_PORT)),
            token=token,
            dagster_home=home,
        )

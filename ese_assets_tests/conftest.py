"""Shared pytest fixtures: databases for the storage, pipeline and orchestration tests.

Databases:

* ``sqlite_db_path`` / ``sqlite_engine``: a fresh SQLite file per test (schema created by the engine
  fixture only).
* ``postgres_url`` / ``postgres_engine``: PostgreSQL from ``ESE_TEST_POSTGRES_URL`` (for example
  ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``). The session creates its own database
  ``ese_test_<random>`` (dropped at the end, ``WITH (FORCE)``), and every test gets a fresh schema
  in it through ``search_path`` in the URL (``?options=-csearch_path%3D<schema>``), so tests never
  see each other's tables and ``make_engine(postgres_url)`` works like any production URL.
  Unset variable: the PostgreSQL tests are skipped, unless ``ESE_REQUIRE_POSTGRES=1`` (CI), then
  they fail.
* ``engine`` / ``db_url``: parametrized over ``["sqlite", "postgresql"]`` so a test runs on both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine

POSTGRES_URL_ENV = "ESE_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "ESE_REQUIRE_POSTGRES"
BACKENDS = ("sqlite", "postgresql")


def _postgres_unavailable(message: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES_ENV, "").strip() in ("1", "true", "yes"):
        pytest.fail(
            f"PostgreSQL tests are required ({REQUIRE_POSTGRES_ENV}=1) but {message}", pytrace=False
        )
    pytest.skip(f"PostgreSQL tests skipped: {message}")


# --------------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_db_path(tmp_path) -> Iterator[str]:
    """Path of a not-yet-existing SQLite file in a nested directory (make_engine creates it)."""
    path = str(tmp_path / "db" / "products.sqlite3")
    yield path
    dispose_engine(path)


@pytest.fixture
def sqlite_engine(sqlite_db_path: str) -> Engine:
    """Engine on a fresh SQLite file with the schema created."""
    engine = make_engine(sqlite_db_path)
    ensure_schema(engine)
    return engine


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _postgres_test_database() -> Iterator[sa.URL]:
    """URL of a database created for this test session on the ESE_TEST_POSTGRES_URL server."""
    raw = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if not raw:
        _postgres_unavailable(
            f"{POSTGRES_URL_ENV} is not set "
            "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)"
        )
    server_url = make_url(raw)
    name = f"ese_test_{uuid.uuid4().hex[:12]}"
    # CREATE/DROP DATABASE cannot run inside a transaction block: AUTOCOMMIT, no pooled connections.
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _postgres_unavailable(
            f"the server at {server_url.render_as_string()} is not usable: {exc.orig}"
        )
    try:
        yield server_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url(_postgres_test_database: sa.URL) -> Iterator[str]:
    """URL (string) of an empty schema, private to this test, in the session's test database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(_postgres_test_database, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = _postgres_test_database.update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    try:
        yield url_text
    finally:
        dispose_engine(url_text)
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def postgres_engine(postgres_url: str) -> Engine:
    """Engine on a private PostgreSQL schema with the tables created."""
    engine = make_engine(postgres_url)
    ensure_schema(engine)
    return engine


# --------------------------------------------------------------------------------------------------
# Both backends
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def db_url(request) -> str:
    """URL or SQLite path of an empty products database, on each backend in turn."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db_path")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=BACKENDS)
def engine(request) -> Engine:
    """Engine with the schema created, on each backend in turn (test ids ``[sqlite]``,
    ``[postgresql]``)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_engine")
    return request.getfixturevalue("postgres_engine")


# --------------------------------------------------------------------------- simulated surveys


@pytest.fixture(scope="session")
def small_survey(tmp_path_factory):
    """A small simulated survey (ese_assets_tests.survey.SMALL_SURVEY), written once per session.

    Directory with incoming/*.fits, catalog.csv and the truth files; tests must not modify it.
    """
    from ese_assets.core.simulate import simulate_survey
    from ese_assets_tests.survey import SMALL_SURVEY

    out = tmp_path_factory.mktemp("small_survey")
    simulate_survey(SMALL_SURVEY, out)
    return out

"""Fault injection for ``test_fault_matrix.py``: a small survey, broken files, a workspace that runs
the real pipeline three ways (the sensor with a real Dagster instance, ``ese_assets.ingest`` in
this process, ``ese ingest`` as a subprocess), external lock holders and connection killers, and
path-independent table snapshots.

Everything here drives production code; nothing re-implements what the pipeline does. Faults are
made the way they happen: bytes written to files (truncated copies, gzip, PNG, headers edited with
astropy), permissions seen by an unprivileged user (``setpriv``), a full file system (tmpfs), a
second SQLite connection holding ``BEGIN IMMEDIATE``, ``pg_terminate_backend`` from another
PostgreSQL session, SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import sqlalchemy as sa
from astropy.io import fits
from astropy.time import Time
from sqlalchemy.pool import NullPool

from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.settings import Settings
from ese_assets.storage.engine import dispose_engine, make_engine
from ese_assets_tests import snapshots

# --------------------------------------------------------------------------------------------------
# The survey
# --------------------------------------------------------------------------------------------------

#: Three nights of three 128x128 images (a third of them 4-D CASA cubes), 25 sources, one deep ESE
#: in the middle night: every stage has work, and a clean run takes a few seconds.
FAULT_SURVEY = SurveyConfig(
    seed=20261202,
    n_nights=3,
    images_per_night=3,
    npix=128,
    n_sources=25,
    n_variables=1,
    n_ese=1,
    ese_depths=(0.6,),
    ese_duration_days=(1.0, 1.0),
    ese_t0_window=(0.5, 0.5),
    ese_min_flux_mjy=50.0,
    cube_fraction=0.34,
)
#: Nine epochs per source: below the default ESE_MIN_OBS (10), so the survey lowers it to let the
#: ESE become a candidate (the candidates table then has something to compare).
FAULT_MIN_OBS = 6

#: Environment shared by every workspace (in-process settings and subprocesses): short retry
#: delays so the recovery paths finish in seconds. The window statistics use the raw epochs: as
#: nightly bins, three nights are three points, too few for the dip rule (windows of >= 3 rows
#: about a robust median) to flag the ESE; how the statistics are binned does not change what
#: recovery must achieve.
FAULT_ENV = {
    "ESE_BIN_NIGHTS": "off",
    "ESE_MIN_OBS": str(FAULT_MIN_OBS),
    "ESE_RETRY_DELAY_S": "0.2",
    "ESE_MAX_ATTEMPTS": "5",
    "ESE_PARTITION_START": "2020-01-01",
    "ESE_TIMEZONE": "UTC",
}

#: Images of the survey are this old (seconds) in every workspace, so no settle time applies.
OLD_MTIME_AGE_S = 3600.0


@dataclass(frozen=True)
class Survey:
    root: Path
    images: tuple[Path, ...]  # good FITS files, in time order
    catalog: Path
    truth_fluxes: pd.DataFrame  # image, name, true_flux_mjy, x_pix, y_pix, in_image, ...
    ese_names: frozenset[str]  # sources with an injected ESE

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.images]

    @property
    def nights(self) -> list[str]:
        return sorted({night_of_name(n) for n in self.names})

    def image(self, name: str) -> Path:
        return self.root / "incoming" / name


def night_of_name(name: str) -> str:
    """``img_20250103T020000.fits`` -> ``2025-01-03`` (the simulator names files by DATE-OBS)."""
    stamp = name.split("_", 1)[1][:8]
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"


def build_survey(out: Path) -> Survey:
    manifest = simulate_survey(FAULT_SURVEY, out)
    truth = pd.read_csv(manifest.truth_sources_path)
    return Survey(
        root=out,
        images=tuple(sorted(manifest.image_paths)),
        catalog=manifest.catalog_path,
        truth_fluxes=pd.read_csv(manifest.truth_fluxes_path),
        ese_names=frozenset(truth.loc[truth["kind"] == "ese", "name"]),
    )


# --------------------------------------------------------------------------------------------------
# Broken files, written the way they occur
# --------------------------------------------------------------------------------------------------


def write_fits_like_garbage(dst: Path, seed: int = 1) -> Path:
    """A FITS-looking start (a valid SIMPLE card) followed by random bytes: a corrupt file."""
    card = b"SIMPLE  =                    T / conforms to FITS standard".ljust(80)
    rng = np.random.default_rng(seed)
    dst.write_bytes(card + rng.integers(0, 256, 3 * 2880, dtype=np.uint8).tobytes())
    return dst


def write_empty(dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def write_copy(src: Path, dst: Path) -> Path:
    shutil.copy2(src, dst)
    return dst


def write_truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_gzip(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def write_png(dst: Path, size: int = 16) -> Path:
    """A valid 8-bit greyscale PNG (signature, IHDR, IDAT, IEND with CRCs): a quick-look plot."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + bytes((x * 16 + y) % 256 for x in range(size)) for y in range(size))
    dst.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return dst


def write_table_only(dst: Path) -> Path:
    """A FITS file whose primary HDU has no data and whose content is a binary table (a catalog)."""
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="RA", format="D", array=np.array([150.0, 150.1])),
            fits.Column(name="DEC", format="D", array=np.array([30.0, 30.1])),
        ]
    )
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(dst)
    return dst


def _plane(data: np.ndarray) -> np.ndarray:
    return np.asarray(data).reshape(data.shape[-2:])


def write_variant(
    src: Path,
    dst: Path,
    *,
    set_keys: dict | None = None,
    delete: Sequence[str] = (),
    date_obs: str | None = None,
    data: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """A copy of ``src`` with header keywords set or deleted, the observation time moved to
    ``date_obs`` (DATE-OBS and MJD-OBS kept consistent) and/or the pixel values transformed.

    ``data`` receives and returns the array in the file's own shape (2-D or 4-D).
    """
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        values = np.array(hdul[0].data)
    if date_obs is not None:
        header["DATE-OBS"] = date_obs
        header["MJD-OBS"] = float(Time(date_obs, scale="utc").mjd)
    for key, value in (set_keys or {}).items():
        header[key] = value
    for key in delete:
        header.remove(key, ignore_missing=True, remove_all=True)
    if data is not None:
        values = data(values).astype(values.dtype)
    tmp = dst.with_name(f".{dst.name}.tmp")
    fits.PrimaryHDU(data=values, header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, dst)
    return dst


def write_nondegenerate_cube(src: Path, dst: Path, *, date_obs: str, n_chan: int = 2) -> Path:
    """A CASA-style 4-D cube (RA, DEC, FREQ, STOKES) with ``n_chan`` frequency channels."""
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        plane = _plane(hdul[0].data)
    cube = np.stack([plane * (1.0 + 0.01 * k) for k in range(n_chan)])[None, :, :, :]
    for key, value in (
        ("CTYPE3", "FREQ"),
        ("CRVAL3", 1.4e9),
        ("CDELT3", 1.0e6),
        ("CRPIX3", 1.0),
        ("CUNIT3", "Hz"),
        ("CTYPE4", "STOKES"),
        ("CRVAL4", 1.0),
        ("CDELT4", 1.0),
        ("CRPIX4", 1.0),
    ):
        header[key] = value
    header["DATE-OBS"] = date_obs
    header["MJD-OBS"] = float(Time(date_obs, scale="utc").mjd)
    fits.PrimaryHDU(data=cube.astype(np.float32), header=header).writeto(dst, overwrite=True)
    return dst


def nan_block(values: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    """``values`` with pixels [y0:y1, x0:x1] of the image plane blank (NaN), any leading axes."""
    out = np.array(values, dtype=np.float32)
    out[..., y0:y1, x0:x1] = np.nan
    return out


def age_file(path: Path, seconds: float = OLD_MTIME_AGE_S) -> None:
    """Set a file's modification time ``seconds`` in the past (a transfer that ended long ago)."""
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def observation_time(name_or_path: str | Path) -> str:
    """DATE-OBS of a survey image."""
    return str(fits.getheader(name_or_path)["DATE-OBS"])


# --------------------------------------------------------------------------------------------------
# Table snapshots that do not depend on where the workspace is
# --------------------------------------------------------------------------------------------------

TABLES = (
    "images",
    "photometry",
    "variability_stats",
    "source_night_sums",
    "source_sums",
    "ese_candidates",
    "image_gains",
    "calibration_references",
)
#: Processing times and bookkeeping: differ between two runs of the same data by design.
IGNORED_COLUMNS = (
    "id",
    "measured_at",
    "updated_at",
    "flagged_at",
    "registered_at",
    "last_measured_at",
    "computed_at",
    "attempts",
    "batch_token",
    "queued_at",
    "next_attempt_at",
    "file_mtime",
    "file_ctime",
)
SORT_KEYS = {
    "images": ["path"],
    "photometry": ["image_path", "source_id"],
    "variability_stats": ["source_id"],
    "source_night_sums": ["source_id", "night"],
    "source_sums": ["source_id"],
    "ese_candidates": ["source_id", "night"],
    "image_gains": ["image_path"],
    "calibration_references": ["source_id", "night"],
}
#: Floats must agree to this relative precision (the incremental sums add nights in a different
#: order after a recovery, which moves the last few bits); ATOL covers values that are ~0.
RTOL = 1e-9
ATOL = 1e-12


def table_frames(engine, image_names: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """Every compared table with paths reduced to file names and bookkeeping columns dropped.

    ``image_names``: the ``images`` rows kept (the good files); None keeps every row.
    """
    keep = None if image_names is None else set(image_names)
    out = {}
    for table in TABLES:
        df = snapshots.table_snapshot(engine, table, exclude=IGNORED_COLUMNS)
        for col in ("path", "image_path"):
            if col in df:
                df[col] = df[col].map(lambda p: Path(p).name)
        if table == "images" and keep is not None:
            df = df[df["path"].isin(keep)]
        keys = [k for k in SORT_KEYS[table] if k in df.columns]
        out[table] = df.sort_values(keys, kind="mergesort").reset_index(drop=True)
    return out


def assert_same_tables(
    expected: dict[str, pd.DataFrame], actual: dict[str, pd.DataFrame], what: str = ""
) -> None:
    """Row for row: the same keys, and every column equal (floats to RTOL)."""
    for table in TABLES:
        exp, act = expected[table], actual[table]
        keys = [k for k in SORT_KEYS[table] if k in exp.columns]
        missing = _keys(exp, keys) - _keys(act, keys)
        extra = _keys(act, keys) - _keys(exp, keys)
        assert not missing and not extra, (
            f"{what}{table}: {len(missing)} rows missing {sorted(missing)[:5]}, "
            f"{len(extra)} unexpected {sorted(extra)[:5]}"
        )
        pd.testing.assert_frame_equal(
            exp, act, check_exact=False, rtol=RTOL, atol=ATOL, obj=f"{what}{table}"
        )


def _keys(df: pd.DataFrame, keys: list[str]) -> set[tuple]:
    return set(df[keys].itertuples(index=False, name=None))


# --------------------------------------------------------------------------------------------------
# Workspaces: the real pipeline, three ways
# --------------------------------------------------------------------------------------------------

SENSOR = "incoming_images_sensor"
JOB = "ese_pipeline"
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def ese_command() -> list[str]:
    """The installed ``ese`` console script of this interpreter (``python -m`` as a fallback)."""
    script = Path(sys.executable).with_name("ese")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ese_assets.cli"]


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class Workspace:
    """An incoming directory, a catalog, a products database and a Dagster home of one case."""

    root: Path
    incoming: Path
    catalog: Path
    home: Path  # DAGSTER_HOME
    products_db: str
    settle_seconds: float = 0.0
    env_overrides: dict[str, str] = field(default_factory=dict)

    # ---- configuration
    def settings(self, **changes) -> Settings:
        """Settings as ``ese`` would read them from :meth:`env`, with ``changes`` applied."""
        with patched_environ(self.env()):
            base = Settings.from_env()
        return dataclasses.replace(base, settle_seconds=self.settle_seconds, **changes)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ESE_", "PIPELINE_", "MASTER_SOURCES", "DAGSTER_"))
        }
        env.update(FAULT_ENV)
        env.update(
            {
                "PIPELINE_PRODUCTS_DB": self.products_db,
                "ESE_CATALOG": str(self.catalog),
                "DAGSTER_HOME": str(self.home),
                "ESE_INCOMING_DIR": str(self.incoming),
                "ESE_DATA_DIR": str(self.root),
                "ESE_SETTLE_SECONDS": str(self.settle_seconds),
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def definitions(self, **changes) -> dg.Definitions:
        from ese_assets.definitions import build_definitions

        return build_definitions(self.settings(**changes), bind_env=False)

    def engine(self):
        """The products engine, created (once per process) with this workspace's environment, so
        settings read at creation such as ESE_DB_BUSY_TIMEOUT_S are the case's."""
        with patched_environ(self.env()):
            return make_engine(self.products_db)

    @property
    def products_db_dir(self) -> Path:
        return Path(self.products_db).parent

    def count_rows(self, table: str) -> int:
        """Rows of ``table`` (0 when the schema does not exist yet)."""
        from ese_assets.storage.schema import metadata

        try:
            with self.engine().connect() as conn:
                return conn.execute(
                    sa.select(sa.func.count()).select_from(metadata.tables[table])
                ).scalar()
        except sa.exc.DBAPIError:
            return 0

    def count_measured(self) -> int:
        try:
            with self.engine().connect() as conn:
                return conn.execute(
                    sa.text("SELECT count(*) FROM images WHERE status = 'measured'")
                ).scalar()
        except sa.exc.DBAPIError:  # the schema is not there yet
            return 0

    # ---- in-process `ese_assets.ingest`
    def ingest(self, **changes):
        """``ingest_directory`` in this process, with this workspace's environment."""
        from ese_assets.ingest import ingest_directory

        settings = self.settings(**changes)
        with patched_environ(self.env()):
            return ingest_directory(settings, self.incoming, progress=lambda _msg: None)

    # ---- `ese ingest` subprocesses
    def cli_args(self, *args: str) -> list[str]:
        return [*ese_command(), *args]

    def popen_ingest(
        self, *args: str, user: str | None = None, env: dict | None = None, **kwargs
    ) -> subprocess.Popen:
        cmd = self.cli_args("ingest", str(self.incoming), *args)
        if user == "nobody":
            cmd = [*AS_NOBODY, *cmd]
        return subprocess.Popen(
            cmd,
            env=env or self.env(HOME=str(self.root)),
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kwargs,
        )

    def run_ingest(
        self, *args: str, user: str | None = None, timeout: float = 240, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        proc = self.popen_ingest(*args, user=user, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"ese ingest did not finish in {timeout} s:\n{out}\n{err}"
            ) from exc
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # ---- the sensor with a real instance
    @contextlib.contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        """The persistent instance of this workspace's DAGSTER_HOME (what ``ese ingest`` uses)."""
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.home / "dagster.yaml").exists():
            shutil.copy(PROJECT_DAGSTER_YAML, self.home / "dagster.yaml")
        with patched_environ({"DAGSTER_HOME": str(self.home)}):
            instance = dg.DagsterInstance.from_config(str(self.home))
            try:
                yield instance
            finally:
                instance.dispose()

    def tick(
        self, instance: dg.DagsterInstance, defs: dg.Definitions | None = None
    ) -> list[dg.RunRequest]:
        """One evaluation of the sensor; returns its run requests."""
        defs = defs or self.definitions()
        sensor = defs.resolve_sensor_def(SENSOR)
        with patched_environ(self.env()):
            result = sensor(
                dg.build_sensor_context(
                    instance=instance, sensor_name=SENSOR, resources=dict(defs.resources)
                )
            )
        if result is None or isinstance(result, dg.SkipReason):
            return []
        if isinstance(result, dg.RunRequest):
            return [result]
        if isinstance(result, list):
            return [r for r in result if isinstance(r, dg.RunRequest)]
        return list(result.run_requests or [])

    def execute(
        self,
        instance: dg.DagsterInstance,
        request: dg.RunRequest,
        defs: dg.Definitions | None = None,
    ) -> bool:
        """Run a sensor's request the way the daemon would (its config, tags, partition)."""
        defs = defs or self.definitions()
        job = defs.resolve_job_def(JOB)
        tags = dict(request.tags)
        if request.run_key:
            tags["dagster/run_key"] = request.run_key
        run_config = {
            **request.run_config,
            "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
        }
        with patched_environ(self.env()):
            result = job.execute_in_process(
                partition_key=request.partition_key,
                run_config=run_config,
                tags=tags,
                instance=instance,
                raise_on_error=False,
            )
        return result.success

    def drive_sensor(
        self,
        instance: dg.DagsterInstance,
        done: Callable[[], bool],
        *,
        timeout: float = 30.0,
        pause: float = 0.25,
        defs: dg.Definitions | None = None,
    ) -> list[bool]:
        """Tick and execute the requested runs until ``done()`` and a tick requests nothing."""
        defs = defs or self.definitions()
        outcomes: list[bool] = []
        deadline = time.monotonic() + timeout
        while True:
            requests = self.tick(instance, defs)
            for request in requests:
                outcomes.append(self.execute(instance, request, defs))
            if not requests and done():
                return outcomes
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the sensor did not finish within {timeout} s; image statuses: "
                    f"{self.statuses()}; run outcomes: {outcomes}"
                )
            if not requests:
                time.sleep(pause)

    # ---- reading the results
    def images(self) -> pd.DataFrame:
        with self.engine().connect() as conn:
            df = pd.read_sql(sa.text("SELECT path, night, status, reason FROM images"), conn)
        df["name"] = df["path"].map(lambda p: Path(p).name)
        return df.set_index("name")

    def statuses(self) -> dict[str, str]:
        return self.images()["status"].to_dict()

    def all_measured(self, names: Iterable[str]) -> Callable[[], bool]:
        names = list(names)

        def check() -> bool:
            statuses = self.statuses()
            return all(statuses.get(n) == "measured" for n in names)

        return check

    def tables(self, image_names: Iterable[str]) -> dict[str, pd.DataFrame]:
        return table_frames(self.engine(), image_names)

    def shift_queue_times(self, seconds: float) -> int:
        """Move the queue bookkeeping of queued images ``seconds`` into the past (time passing)."""
        with self.engine().begin() as conn:
            return conn.execute(
                sa.text(
                    "UPDATE images SET queued_at = queued_at - :s, "
                    "next_attempt_at = next_attempt_at - :s WHERE status = 'queued'"
                ),
                {"s": float(seconds)},
            ).rowcount

    def close(self) -> None:
        dispose_engine(self.products_db)


def make_workspace(
    root: Path,
    survey: Survey,
    *,
    names: Iterable[str] | None = None,
    products_db: str | None = None,
    settle_seconds: float = 0.0,
) -> Workspace:
    """A private copy of the survey's good images (``names``; default all) and of its catalog."""
    root.mkdir(parents=True, exist_ok=True)
    incoming = root / "incoming"
    incoming.mkdir()
    for name in survey.names if names is None else names:
        shutil.copy2(survey.image(name), incoming / name)
        age_file(incoming / name)
    catalog = root / "catalog.csv"
    shutil.copy2(survey.catalog, catalog)
    return Workspace(
        root=root,
        incoming=incoming,
        catalog=catalog,
        home=root / "dagster_home",
        products_db=products_db or str(root / "db" / "products.sqlite3"),
        settle_seconds=settle_seconds,
    )


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, restored after (even keys the
    code under test set itself, such as DAGSTER_HOME)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------------
# External actors: a process killer, an SQLite lock holder, a PostgreSQL connection killer
# --------------------------------------------------------------------------------------------------


def count_measured_sqlite(db_path: str) -> int:
    """Measured images, read through a separate plain sqlite3 connection (WAL: never blocks)."""
    if not Path(db_path).exists():
        return 0
    conn = sqlite3.connect(db_path, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM images WHERE status = 'measured'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.01,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        if not alive():
            raise AssertionError(f"the process finished before {what}")
        time.sleep(interval)


class SqliteLockHolder(threading.Thread):
    """An external writer: once ``min_measured`` images are measured, holds the database's write
    lock (``BEGIN IMMEDIATE`` on its own connection) for ``hold_s`` seconds, then commits."""

    def __init__(
        self, db_path: str, *, hold_s: float, min_measured: int = 1, timeout: float = 120.0
    ):
        super().__init__(daemon=True)
        self.db_path, self.hold_s, self.min_measured = db_path, hold_s, min_measured
        self.timeout = timeout
        self.measured_when_locked: int | None = None
        self.held_s: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            wait_for(
                lambda: count_measured_sqlite(self.db_path) >= self.min_measured,
                self.timeout,
                "the first measured image",
                interval=0.005,
            )
            conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                started = time.monotonic()
                self.measured_when_locked = conn.execute(
                    "SELECT count(*) FROM images WHERE status = 'measured'"
                ).fetchone()[0]
                time.sleep(self.hold_s)
                conn.execute("COMMIT")
                self.held_s = time.monotonic() - started
            finally:
                conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


class PostgresConnectionKiller(threading.Thread):
    """Terminates (``pg_terminate_backend``) the products database's connections that are in the
    middle of a statement or transaction touching ``tables``, from a separate session, up to
    ``max_kills`` times, at least ``spacing_s`` apart, once ``min_measured`` images are measured.
    """

    def __init__(
        self,
        url: str,
        *,
        tables: Sequence[str],
        max_kills: int = 2,
        min_measured: int = 1,
        spacing_s: float = 0.3,
        timeout: float = 120.0,
    ):
        super().__init__(daemon=True)
        self.url, self.tables, self.max_kills = url, tuple(tables), max_kills
        self.min_measured, self.spacing_s, self.timeout = min_measured, spacing_s, timeout
        self.killed: list[tuple[str, str]] = []  # (state, query) of each terminated backend
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        engine = sa.create_engine(self.url, poolclass=NullPool)
        like = " OR ".join(f"query ILIKE :t{i}" for i in range(len(self.tables)))
        params = {f"t{i}": f"%{t}%" for i, t in enumerate(self.tables)}
        find = sa.text(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction') "
            f"AND ({like})"
        )
        try:
            deadline = time.monotonic() + self.timeout
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while not self.stop.is_set() and time.monotonic() < deadline:
                    measured = (
                        conn.execute(
                            sa.text("SELECT count(*) FROM images WHERE status = 'measured'")
                        ).scalar()
                        if self._has_images(conn)
                        else 0
                    )
                    if measured >= self.min_measured:
                        break
                    time.sleep(0.005)
                while (
                    not self.stop.is_set()
                    and len(self.killed) < self.max_kills
                    and time.monotonic() < deadline
                ):
                    rows = conn.execute(find, params).all()
                    for pid, state, query in rows:
                        if conn.execute(
                            sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
                        ).scalar():
                            self.killed.append((state, query))
                    if rows:
                        time.sleep(self.spacing_s)
                    else:
                        time.sleep(0.002)
        except BaseException as exc:
            self.error = exc
        finally:
            engine.dispose()

    @staticmethod
    def _has_images(conn) -> bool:
        return conn.execute(sa.text("SELECT to_regclass('images') IS NOT NULL")).scalar()


# --------------------------------------------------------------------------------------------------
# A small full file system
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``mountpoint``; yields False when mounting is impossible."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill_file_system(directory: Path, leave_bytes: int) -> Path:
    """Write a ballast file until only about ``leave_bytes`` remain free on ``directory``'s file
    system; returns the ballast (delete it to free the space)."""
    ballast = directory / "ballast.bin"
    free = shutil.disk_usage(directory).free
    chunk = b"\0" * 4096
    with open(ballast, "wb") as fh:
        to_write = max(0, free - leave_bytes)
        with contextlib.suppress(OSError):
            while to_write > 0:
                fh.write(chunk[: min(len(chunk), to_write)])
                to_write -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    return ballast


def one_line(stderr: str) -> list[str]:
    """Non-empty lines of a process's stderr."""
    return [line for line in stderr.splitlines() if line.strip()]

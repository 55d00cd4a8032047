"""Fault matrix: every fault ends with the tables of a clean run of the good files, row for row.

One small simulated survey (3 nights x 3 images, 25 sources, an ESE) and one clean baseline (the
good files through ``ese_assets.ingest``) per module. Each case injects one fault, runs the real
pipeline through the sensor (evaluated with a persistent Dagster instance, its run requests
executed the way the daemon would), through ``ese_assets.ingest`` in this process, or through
``ese ingest`` subprocesses, then asserts

* ``photometry``, ``variability_stats``, ``source_night_sums``, ``source_sums``,
  ``ese_candidates`` and the ``images`` rows of the good files equal the baseline's (file names
  instead of paths; processing times and queue bookkeeping left out; floats to 1e-9 relative),
* the bad file's status, and that its reason names the problem.

Cases (``CASES`` below; id, path):

=============================  =============  ==================================================
corrupt_fits                   sensor         random bytes after a valid SIMPLE card
truncated_fits                 ingest         first half of an image
partial_transfer_name          sensor         ``x.fits.part`` ignored, then renamed and measured
still_being_written            sensor         recent mtime: waited for, measured once settled
empty_file                     ingest         zero bytes
gzip_file                      sensor         a gzip-compressed image
png_file                       cli            a PNG named .fits (rejected) and one named .png
table_only_fits                ingest         FITS with a binary table and no image
duplicate_copy                 cli            a good image copied under another name
symlinks                       sensor         image reachable only through a symlink; an alias
unreadable_then_readable       cli (nobody)   mode 000 for ``ese ingest`` run as nobody, then 644
nan_block                      sensor         NaN block over sources: measured, sources flagged
cube_nondegenerate             ingest         4-D cube with two frequency channels
missing_bmaj                   sensor         no BMAJ
missing_time                   ingest         no DATE-OBS / MJD-OBS
no_wcs                         sensor         no CTYPE1/CTYPE2
all_zero                       ingest         every pixel 0
dated_2099                     sensor+ingest  clock skew: its night does not exist yet
time_keywords_disagree         cli            MJD-OBS an hour away from DATE-OBS
bunit_kelvin                   sensor         BUNIT = 'K'
rewritten_in_place             ingest+sensor  same name and size, new data: rows replaced
truncated_then_completed       ingest         rejected while truncated, measured once complete
sigkill_ingest                 cli            ``ese ingest`` killed mid-run, then re-run
sigkill_ingest_postgres        cli (pg)       the same on PostgreSQL
disk_full                      cli            products DB on a full tmpfs, freed, re-run
broken_catalog                 cli            one line naming the catalog, then fixed, re-run
database_unreachable           cli            PostgreSQL down: one line, non-zero; then clean
sqlite_lock_during_ingest      ingest         BEGIN IMMEDIATE held 3 s past a 0.5 s timeout
sqlite_lock_during_sensor_run  sensor         the same through the sensor's runs
pg_terminated_photometry       ingest (pg)    backends killed in photometry transactions
pg_terminated_statistics       sensor (pg)    backends killed in the statistics stage
run_failed_images_queued       sensor         a run fails (catalog gone); re-requested
daemon_died_before_launch      sensor         requests never launched; re-requested after grace
two_ingests_new_home           cli x2         two ``ese ingest`` at once on a new DAGSTER_HOME
ingest_while_sensor_runs       cli+sensor     ``ese ingest`` while the sensor works the same dir
=============================  =============  ==================================================
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.time import Time

from ese_assets.storage.engine import ensure_schema
from ese_assets_tests import faults
from ese_assets_tests.faults import Survey, Workspace

#: A time in the middle night at which no good image was taken (variants that pass the header
#: checks must not be duplicates of a good image); minute k for the k-th variant.
SPARE_TIME = "2025-01-02T12:{:02d}:00"
#: Which night first flagged a candidate depends on the order its nights ran; only processes
#: that run nights concurrently may legitimately change it.
ORDER_DEPENDENT = {"ese_candidates": ["night", "last_night"]}


# --------------------------------------------------------------------------------------------------
# Module fixtures: one survey, one clean baseline
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Survey:
    return faults.build_survey(tmp_path_factory.mktemp("fault_survey"))


@pytest.fixture(scope="module")
def baseline(survey, tmp_path_factory) -> dict[str, pd.DataFrame]:
    ws = faults.make_workspace(tmp_path_factory.mktemp("fault_baseline"), survey)
    ws.ingest()
    tables = ws.tables(survey.names)
    ws.close()
    images = tables["images"]
    assert list(images["status"]) == ["measured"] * len(survey.names)
    assert len(tables["photometry"]) > 150 and len(tables["variability_stats"]) >= 20
    # The baseline is right, not just repeatable: fluxes agree with the injected ones within their
    # errors, and the injected ESE is the candidate.
    phot = tables["photometry"]
    phot = phot[phot["quality_flag"] == 0].merge(
        survey.truth_fluxes, left_on=["image_path", "source_id"], right_on=["image", "name"]
    )
    assert len(phot) > 100
    pull = (phot["peak_jyb"] * 1e3 - phot["true_flux_mjy"]) / (phot["peak_err_jyb"] * 1e3)
    assert abs(pull.median()) < 0.3 and 0.6 < pull.std() < 1.6, pull.describe()
    assert set(tables["ese_candidates"]["source_id"]) == survey.ese_names, (
        f"the injected ESE {set(survey.ese_names)} is not the candidate (detection settings: "
        f"{ {k: v for k, v in faults.FAULT_ENV.items() if k.startswith('ESE_')} })"
    )
    return tables


@dataclass
class Harness:
    survey: Survey
    baseline: dict[str, pd.DataFrame]
    tmp: Path
    request: pytest.FixtureRequest
    workspaces: list[Workspace] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return self.survey.names

    def workspace(
        self,
        name: str = "ws",
        *,
        names=None,
        postgres: bool = False,
        products_db: str | None = None,
        settle_seconds: float = 0.0,
        root: Path | None = None,
    ) -> Workspace:
        if postgres:
            products_db = self.request.getfixturevalue("postgres_url")
        ws = faults.make_workspace(
            root or self.tmp / name,
            self.survey,
            names=names,
            products_db=products_db,
            settle_seconds=settle_seconds,
        )
        self.workspaces.append(ws)
        return ws

    def clean_run(self, files: dict[str, Path], name: str = "clean") -> dict[str, pd.DataFrame]:
        """Tables of a clean ``ingest`` of exactly ``files`` (name -> content), for cases whose
        final good content differs from the survey's."""
        ws = self.workspace(name, names=[])
        for fname, src in files.items():
            shutil.copy2(src, ws.incoming / fname)
            faults.age_file(ws.incoming / fname)
        ws.ingest()
        assert set(ws.statuses().values()) == {"measured"}, ws.statuses()
        return ws.tables(files)

    def check(
        self,
        ws: Workspace,
        *,
        expected: dict | None = None,
        bad: dict[str, tuple[set[str], str]] | None = None,
        absent: tuple[str, ...] = (),
        ignore: dict[str, list[str]] | None = None,
    ) -> None:
        """Tables of the good files equal ``expected`` (default: the baseline); each bad file has
        one of the statuses and a reason matching the pattern; ``absent`` files have no row."""
        expected = expected or self.baseline
        actual = ws.tables(self.names)
        if ignore:
            expected = {t: df.drop(columns=ignore.get(t, [])) for t, df in expected.items()}
            actual = {t: df.drop(columns=ignore.get(t, [])) for t, df in actual.items()}
        faults.assert_same_tables(expected, actual)
        images = ws.images()
        for name, (statuses, pattern) in (bad or {}).items():
            assert name in images.index, f"{name} has no images row; rows: {list(images.index)}"
            status, reason = images.loc[name, "status"], images.loc[name, "reason"]
            assert status in statuses, f"{name}: status {status!r}, expected one of {statuses}"
            assert reason and re.search(pattern, reason, re.IGNORECASE), (
                f"{name}: reason {reason!r} does not match {pattern!r}"
            )
        for name in absent:
            assert name not in images.index, f"{name} should not be registered"


@pytest.fixture
def h(survey, baseline, tmp_path, request) -> Harness:
    harness = Harness(survey, baseline, tmp_path, request)
    yield harness
    for ws in harness.workspaces:
        ws.close()


def run_path(h: Harness, ws: Workspace, path: str) -> None:
    """Run the whole directory through one of the three paths until the good files are done."""
    if path == "sensor":
        with ws.instance() as instance:
            ws.drive_sensor(instance, ws.all_measured(h.names))
    elif path == "ingest":
        ws.ingest()
    elif path == "cli":
        done = ws.run_ingest()
        assert done.returncode == 0, f"ese ingest exited {done.returncode}:\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
    else:  # pragma: no cover - a typo in the table
        raise ValueError(path)


def two_d_image(survey: Survey) -> Path:
    """A good image written as a plain 2-D array (not a cube)."""
    for path in survey.images:
        if fits.getheader(path)["NAXIS"] == 2:
            return path
    raise AssertionError("the survey has no 2-D image")


# --------------------------------------------------------------------------------------------------
# Bad files that are rejected (or wait) while the good ones are measured
# --------------------------------------------------------------------------------------------------

REJECTED = {"rejected"}


@dataclass(frozen=True)
class BadFile:
    filename: str
    write: Callable[[Survey, Path], Path]  # (survey, destination) -> written file
    statuses: set[str]
    reason: str  # regular expression the reason must match


BAD_FILES = {
    "corrupt_fits": BadFile(
        "corrupt.fits", lambda s, d: faults.write_fits_like_garbage(d), REJECTED, r"corrupt"
    ),
    "truncated_fits": BadFile(
        "truncated.fits",
        lambda s, d: faults.write_truncated(s.images[4], d, 0.5),
        REJECTED,
        r"truncated",
    ),
    "empty_file": BadFile("empty.fits", lambda s, d: faults.write_empty(d), REJECTED, r"empty"),
    "gzip_file": BadFile(
        "compressed.fits", lambda s, d: faults.write_gzip(s.images[2], d), REJECTED, r"gzip"
    ),
    "table_only_fits": BadFile(
        "table.fits", lambda s, d: faults.write_table_only(d), REJECTED, r"no image data"
    ),
    "duplicate_copy": BadFile(
        "zz_copy_of_night2.fits",
        lambda s, d: faults.write_copy(s.images[3], d),
        REJECTED,
        r"duplicate of \S*img_20250102T020000\.fits",
    ),
    "cube_nondegenerate": BadFile(
        "cube2chan.fits",
        lambda s, d: faults.write_nondegenerate_cube(
            two_d_image(s), d, date_obs=SPARE_TIME.format(1)
        ),
        REJECTED,
        r"non-degenerate axis 3 \(FREQ, length 2\)",
    ),
    "missing_bmaj": BadFile(
        "nobmaj.fits",
        lambda s, d: faults.write_variant(
            s.images[1], d, delete=["BMAJ"], date_obs=SPARE_TIME.format(2)
        ),
        REJECTED,
        r"BMAJ",
    ),
    "missing_time": BadFile(
        "notime.fits",
        lambda s, d: faults.write_variant(s.images[1], d, delete=["DATE-OBS", "MJD-OBS"]),
        REJECTED,
        r"MJD-OBS or DATE-OBS|DATE-OBS.*MJD-OBS|observation time",
    ),
    "no_wcs": BadFile(
        "nowcs.fits",
        lambda s, d: faults.write_variant(
            two_d_image(s), d, delete=["CTYPE1", "CTYPE2"], date_obs=SPARE_TIME.format(3)
        ),
        REJECTED,
        r"celestial WCS",
    ),
    "all_zero": BadFile(
        "zeros.fits",
        lambda s, d: faults.write_variant(
            s.images[1], d, date_obs=SPARE_TIME.format(4), data=np.zeros_like
        ),
        REJECTED,
        r"constant|all pixels = 0|zero",
    ),
    "time_keywords_disagree": BadFile(
        "clockmix.fits",
        lambda s, d: faults.write_variant(
            s.images[1],
            d,
            date_obs=SPARE_TIME.format(5),
            set_keys={"MJD-OBS": Time(SPARE_TIME.format(5)).mjd + 1.0 / 24.0},
        ),
        REJECTED,
        r"DATE-OBS '2025-01-02T12:05:00(\.000)?' and MJD-OBS 60677\.54.* disagree",
    ),
    "bunit_kelvin": BadFile(
        "kelvin.fits",
        lambda s, d: faults.write_variant(
            s.images[1], d, set_keys={"BUNIT": "K"}, date_obs=SPARE_TIME.format(6)
        ),
        REJECTED,
        r"BUNIT 'K'",
    ),
}

BAD_FILE_PATHS = {
    "corrupt_fits": "sensor",
    "truncated_fits": "ingest",
    "empty_file": "ingest",
    "gzip_file": "sensor",
    "table_only_fits": "ingest",
    "duplicate_copy": "cli",
    "cube_nondegenerate": "ingest",
    "missing_bmaj": "sensor",
    "missing_time": "ingest",
    "no_wcs": "sensor",
    "all_zero": "ingest",
    "time_keywords_disagree": "cli",
    "bunit_kelvin": "sensor",
}


def bad_file_case(case_id: str) -> Callable[[Harness], None]:
    spec = BAD_FILES[case_id]

    def run(h: Harness) -> None:
        ws = h.workspace()
        target = ws.incoming / spec.filename
        spec.write(h.survey, target)
        faults.age_file(target)
        run_path(h, ws, BAD_FILE_PATHS[case_id])
        h.check(ws, bad={spec.filename: (spec.statuses, spec.reason)})

    run.__doc__ = f"{spec.filename} through {BAD_FILE_PATHS[case_id]}"
    return run


# --------------------------------------------------------------------------------------------------
# Files that change, wait or are reached indirectly
# --------------------------------------------------------------------------------------------------


def case_png_file(h: Harness) -> None:
    """A PNG quick-look under a FITS name is rejected as not FITS; one under its own name is
    either ignored (not an image) or rejected the same way, never measured."""
    ws = h.workspace()
    faults.write_png(ws.incoming / "quicklook.fits")
    faults.write_png(ws.incoming / "quicklook.png")
    run_path(h, ws, "cli")
    h.check(ws, bad={"quicklook.fits": (REJECTED, r"not a FITS file")})
    images = ws.images()
    if "quicklook.png" in images.index:
        assert images.loc["quicklook.png", "status"] == "rejected"
        assert "not a FITS file" in images.loc["quicklook.png", "reason"]


def case_partial_transfer_name(h: Harness) -> None:
    """A transfer in progress under ``*.fits.part`` is never looked at; renamed, it is measured."""
    last = h.names[-1]
    ws = h.workspace(names=h.names[:-1])
    part = ws.incoming / f"{last}.part"
    faults.write_truncated(h.survey.image(last), part, 0.3)
    faults.age_file(part)
    with ws.instance() as instance:
        ws.drive_sensor(instance, ws.all_measured(h.names[:-1]))
        assert part.name not in ws.images().index
        part.write_bytes(h.survey.image(last).read_bytes())  # the transfer completes...
        os.replace(part, ws.incoming / last)  # ...and is renamed to its final name
        ws.drive_sensor(instance, ws.all_measured(h.names))
    h.check(ws, absent=(part.name,))


def case_still_being_written(h: Harness) -> None:
    """A file modified within the settle time is not registered (not even rejected while it is
    incomplete); once it has settled it is measured."""
    last = h.names[-1]
    ws = h.workspace(names=h.names[:-1], settle_seconds=30.0)
    growing = ws.incoming / last
    faults.write_truncated(h.survey.image(last), growing, 0.6)  # mtime: now
    with ws.instance() as instance:
        ws.drive_sensor(instance, ws.all_measured(h.names[:-1]))
        assert last not in ws.images().index, "a file still being written was registered"
        growing.write_bytes(h.survey.image(last).read_bytes())
        faults.age_file(growing, 60.0)  # the writer finished a minute ago
        ws.drive_sensor(instance, ws.all_measured(h.names))
    h.check(ws)


def case_symlinks(h: Harness) -> None:
    """An image reachable only through a symlink is measured once; a second link to an image
    already in the directory is not measured again."""
    last, first = h.names[-1], h.names[0]
    ws = h.workspace(names=h.names[:-1])
    archive = ws.root / "archive"
    archive.mkdir()
    shutil.copy2(h.survey.image(last), archive / last)
    faults.age_file(archive / last)
    (ws.incoming / last).symlink_to(archive / last)
    (ws.incoming / "alias.fits").symlink_to(ws.incoming / first)
    with ws.instance() as instance:
        ws.drive_sensor(instance, ws.all_measured(h.names))
    images = ws.images()
    if "alias.fits" in images.index:  # registered under its own name: must be a duplicate
        h.check(ws, bad={"alias.fits": (REJECTED, r"duplicate of \S*" + re.escape(first))})
    else:
        h.check(ws)


def case_unreadable_then_readable(h: Harness) -> None:
    """``ese ingest`` run as an unprivileged user cannot read a mode-000 file: it is rejected with
    the reason; made readable (only its ctime changes), the next plain run measures it."""
    last = h.names[-1]
    # root reads mode-000 files: as root, ``ese ingest`` runs as nobody in a directory it owns
    # (pytest's tmp is root-only); as anyone else, as that user.
    user = "nobody" if os.geteuid() == 0 else None
    if user:
        root = Path(tempfile.mkdtemp(prefix="ese-fault-nobody-"))
        h.request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
        os.chmod(root, 0o755)
        ws = h.workspace(root=root / "ws")
    else:
        ws = h.workspace()

    def hand_over() -> None:  # everything to nobody, except the file it must not read
        if user:
            ws.close()  # root's connection may have created the WAL files
            subprocess.run(["chown", "-R", "nobody:nogroup", str(ws.root)], check=True)
            os.chown(locked, 0, 0)

    locked = ws.incoming / last
    os.chmod(locked, 0o000)
    hand_over()
    first = ws.run_ingest(user=user)
    assert first.returncode == 0, first.stderr
    assert ws.statuses()[last] == "rejected", ws.statuses()
    assert re.search(r"permission denied", ws.images().loc[last, "reason"], re.IGNORECASE)
    os.chmod(locked, 0o644)
    hand_over()
    second = ws.run_ingest(user=user)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in first.stderr + second.stderr
    h.check(ws)


def case_nan_block(h: Harness) -> None:
    """A blank (NaN) block over some sources: the image is measured; the sources on the block have
    no measurement there (or one flagged blank), and their statistics leave that epoch out."""
    target = h.names[-1]
    truth = h.survey.truth_fluxes
    here = truth[(truth["image"] == target) & truth["in_image"]]
    inner = here[(here["x_pix"].between(20, 100)) & (here["y_pix"].between(20, 100))]
    centre = inner.iloc[0]
    x0, y0 = int(centre["x_pix"]) - 12, int(centre["y_pix"]) - 12
    x1, y1 = x0 + 25, y0 + 25
    on_block = set(
        here.loc[
            here["x_pix"].between(x0 + 3, x1 - 4) & here["y_pix"].between(y0 + 3, y1 - 4), "name"
        ]
    )
    assert on_block
    ws = h.workspace(names=h.names[:-1])
    blanked = faults.write_variant(
        h.survey.image(target), ws.root / target, data=lambda v: faults.nan_block(v, x0, x1, y0, y1)
    )
    final = {n: h.survey.image(n) for n in h.names[:-1]} | {target: blanked}
    expected = h.clean_run(final)
    shutil.copy2(blanked, ws.incoming / target)
    faults.age_file(ws.incoming / target)
    run_path(h, ws, "sensor")
    h.check(ws, expected=expected)
    tables = ws.tables(h.names)
    phot = tables["photometry"]
    rows = phot[(phot["image_path"] == target) & phot["source_id"].isin(on_block)]
    assert ((rows["quality_flag"] & 8) != 0).all(), rows
    stats = tables["variability_stats"].set_index("source_id")
    base = h.baseline["variability_stats"].set_index("source_id")
    for name in on_block:
        assert stats.loc[name, "n_obs"] == base.loc[name, "n_obs"] - 1, name
    assert ws.statuses()[target] == "measured"


def case_dated_2099(h: Harness) -> None:
    """Clock skew: an image whose night does not exist yet is recorded with that reason, not
    measured, and does not stop the other nights (sensor, then ``ingest`` again)."""
    ws = h.workspace()
    future = faults.write_variant(
        h.survey.images[1], ws.incoming / "future.fits", date_obs="2099-01-02T03:00:00"
    )
    faults.age_file(future)
    run_path(h, ws, "sensor")
    run_path(h, ws, "ingest")
    h.check(ws, bad={"future.fits": ({"pending", "rejected"}, r"2099-01-02")})


def case_rewritten_in_place(h: Harness) -> None:
    """An image rewritten in place (same name and size, new data) after it was measured is
    measured again and its rows replaced: the tables equal a clean run of the final content."""
    target = h.names[-1]
    ws = h.workspace()
    run_path(h, ws, "ingest")
    h.check(ws)
    rewritten = faults.write_variant(
        h.survey.image(target), ws.root / target, data=lambda v: v * np.float32(0.7)
    )
    assert rewritten.stat().st_size == (ws.incoming / target).stat().st_size
    final = {n: h.survey.image(n) for n in h.names[:-1]} | {target: rewritten}
    expected = h.clean_run(final)
    before_after = h.baseline["photometry"].merge(
        expected["photometry"], on=["image_path", "source_id"], suffixes=("_old", "_new")
    )
    mine = before_after[before_after["image_path"] == target]
    assert len(mine) > 10 and not np.allclose(mine["peak_jyb_old"], mine["peak_jyb_new"])
    shutil.copyfile(rewritten, ws.incoming / target)  # in place: same inode, new content
    with ws.instance() as instance:
        ws.drive_sensor(instance, ws.all_measured(h.names))
    h.check(ws, expected=expected)


def case_truncated_then_completed(h: Harness) -> None:
    """A transfer that stalled past the settle time is rejected as truncated; when it completes,
    the next plain run examines it again and measures it."""
    last = h.names[-1]
    ws = h.workspace(names=h.names[:-1])
    faults.write_truncated(h.survey.image(last), ws.incoming / last, 0.4)
    faults.age_file(ws.incoming / last)
    run_path(h, ws, "ingest")
    assert ws.statuses()[last] == "rejected"
    assert "truncated" in ws.images().loc[last, "reason"]
    (ws.incoming / last).write_bytes(h.survey.image(last).read_bytes())
    run_path(h, ws, "ingest")
    h.check(ws)


# --------------------------------------------------------------------------------------------------
# Processes that die, disks that fill, catalogs that break
# --------------------------------------------------------------------------------------------------


def _kill_mid_run_then_rerun(h: Harness, ws: Workspace) -> None:
    proc = ws.popen_ingest()
    try:
        faults.wait_for(
            lambda: ws.count_measured() >= 4,
            180,
            "4 measured images",
            alive=lambda: proc.poll() is None,
            interval=0.005,
        )
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    measured = ws.count_measured()
    assert 4 <= measured < len(h.names), f"killed after {measured} images"
    ws.close()
    again = ws.run_ingest()
    print(f"re-run after the kill:\n{again.stdout}\n{again.stderr}")  # shown on failure
    assert again.returncode == 0, again.stderr
    h.check(ws)
    assert re.search(r"resum", again.stdout, re.IGNORECASE), (
        f"the re-run does not say what it resumed:\n{again.stdout}"
    )


def case_sigkill_ingest(h: Harness) -> None:
    """SIGKILL of ``ese ingest`` in the middle of the second night, then one plain re-run."""
    _kill_mid_run_then_rerun(h, h.workspace())


def case_sigkill_ingest_postgres(h: Harness) -> None:
    """The same with the products database on PostgreSQL."""
    _kill_mid_run_then_rerun(h, h.workspace(postgres=True))


def case_disk_full(h: Harness) -> None:
    """The products database's file system fills up during ``ese ingest``: it fails with one line
    and a non-zero exit; once space is freed, one plain re-run gives the clean tables."""
    mount = h.tmp / "dbfs"
    with faults.small_tmpfs(mount, "8m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (not root?): the full-disk case needs one")
        ws = h.workspace(products_db=str(mount / "products.sqlite3"))
        ensure_schema(ws.engine())
        ws.close()
        ballast = faults.fill_file_system(mount, leave_bytes=220 * 1024)
        full = ws.run_ingest()
        assert full.returncode != 0, f"ese ingest succeeded on a full disk:\n{full.stdout}"
        measured = ws.count_measured()
        assert 0 < measured < len(h.names), f"the disk filled after {measured} images"
        lines = faults.one_line(full.stderr)
        assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
        ws.close()
        ballast.unlink()
        again = ws.run_ingest()
        assert again.returncode == 0, again.stderr
        h.check(ws)
        ws.close()


def case_broken_catalog(h: Harness) -> None:
    """A catalog without positions: ``ese ingest`` exits non-zero with one line naming the file,
    measures nothing; after the catalog is fixed, one plain re-run gives the clean tables."""
    ws = h.workspace()
    good = ws.catalog.read_bytes()
    ws.catalog.write_text("name,flux_mjy\nsrc1,12.5\nsrc2,7.0\n")
    broken = ws.run_ingest()
    assert broken.returncode != 0
    lines = faults.one_line(broken.stderr)
    assert len(lines) == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert str(ws.catalog) in lines[0] or ws.catalog.name in lines[0], lines
    assert ws.count_measured() == 0
    assert ws.count_rows("photometry") == 0
    ws.catalog.write_bytes(good)
    fixed = ws.run_ingest()
    assert fixed.returncode == 0, fixed.stderr
    h.check(ws)


# --------------------------------------------------------------------------------------------------
# A busy or unreachable database
# --------------------------------------------------------------------------------------------------


def case_database_unreachable(h: Harness) -> None:
    """A products database that stays unreachable: ``ese ingest`` retries, then exits non-zero
    with one line (no traceback); pointed at a working database, one plain run is clean."""
    ws = h.workspace()
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{port}/ese"
    down = ws.run_ingest(env=ws.env(PIPELINE_PRODUCTS_DB=dead, HOME=str(ws.root)))
    assert down.returncode != 0, down.stdout
    lines = faults.one_line(down.stderr)
    assert len(lines) == 1 and "Traceback" not in down.stderr, down.stderr
    assert re.search(r"database|connect|refused", lines[0], re.IGNORECASE), lines
    run_path(h, ws, "cli")
    h.check(ws)


LOCK_ENV = {"ESE_DB_BUSY_TIMEOUT_S": "0.5", "ESE_RETRY_DELAY_S": "0.5"}


def _with_lock_holder(h: Harness, path: str) -> None:
    ws = h.workspace()
    ws.env_overrides.update(LOCK_ENV)
    holder = faults.SqliteLockHolder(ws.products_db, hold_s=3.0, min_measured=1)
    holder.start()
    if path == "sensor":
        with ws.instance() as instance:
            ws.drive_sensor(instance, ws.all_measured(h.names), timeout=90)
    else:
        ws.ingest()
    holder.join(timeout=60)
    assert holder.error is None, holder.error
    assert holder.held_s is not None and holder.held_s >= 3.0
    assert holder.measured_when_locked < len(h.names), "the lock was taken after photometry"
    h.check(ws)


def case_sqlite_lock_during_ingest(h: Harness) -> None:
    """Another writer holds the SQLite write lock for 3 s (busy timeout 0.5 s) while photometry
    runs: retried, every image measured, none failed."""
    _with_lock_holder(h, "ingest")


def case_sqlite_lock_during_sensor_run(h: Harness) -> None:
    """The same lock during the sensor's runs."""
    _with_lock_holder(h, "sensor")


def _with_connection_killer(h: Harness, path: str, tables: tuple[str, ...]) -> None:
    ws = h.workspace(postgres=True)
    killer = faults.PostgresConnectionKiller(ws.products_db, tables=tables, max_kills=2)
    killer.start()
    try:
        if path == "sensor":
            with ws.instance() as instance:
                ws.drive_sensor(instance, ws.all_measured(h.names), timeout=90)
        else:
            ws.ingest()
    finally:
        killer.stop.set()
        killer.join(timeout=30)
    assert killer.error is None, killer.error
    assert killer.killed, f"no connection was caught working on {tables}"
    print("terminated:", *(f"{state}: {query[:100]}" for state, query in killer.killed), sep="\n")
    h.check(ws)


def case_pg_terminated_photometry(h: Harness) -> None:
    """PostgreSQL backends terminated in the middle of photometry transactions."""
    _with_connection_killer(h, "ingest", ("photometry",))


def case_pg_terminated_statistics(h: Harness) -> None:
    """PostgreSQL backends terminated in the middle of the statistics stage."""
    _with_connection_killer(h, "sensor", ("source_night_sums", "source_sums", "variability_stats"))


# --------------------------------------------------------------------------------------------------
# Runs that fail or never start; concurrent processes
# --------------------------------------------------------------------------------------------------


def case_run_failed_images_queued(h: Harness) -> None:
    """The last night's run fails (its catalog is gone); its images are not lost: the sensor
    requests them again and they are measured."""
    ws = h.workspace()
    last_night = h.survey.nights[-1]
    with ws.instance() as instance:
        defs = ws.definitions()
        requests = sorted(ws.tick(instance, defs), key=lambda r: r.partition_key)
        assert [r.partition_key for r in requests] == h.survey.nights
        for request in requests[:-1]:
            assert ws.execute(instance, request, defs)
        gone = ws.definitions(catalog_path=str(ws.root / "moved_away.csv"))
        assert not ws.execute(instance, requests[-1], gone)
        images = ws.images()
        night3 = images[images["night"] == last_night]
        assert set(night3["status"]) <= {"queued", "failed"}, night3
        ws.drive_sensor(instance, ws.all_measured(h.names), defs=defs)
    h.check(ws)


def case_daemon_died_before_launch(h: Harness) -> None:
    """The sensor queued the images but the daemon died before launching the runs: within the
    grace period nothing is requested twice; after it, the images are requested again."""
    ws = h.workspace()
    with ws.instance() as instance:
        defs = ws.definitions()
        lost = ws.tick(instance, defs)  # never launched
        assert lost
        assert set(ws.statuses().values()) == {"queued"}
        assert ws.tick(instance, defs) == [], "orphans re-requested within the grace period"
        assert ws.shift_queue_times(200.0) == len(h.names)  # 200 s pass
        ws.drive_sensor(instance, ws.all_measured(h.names), defs=defs)
    h.check(ws)


def case_two_ingests_new_home(h: Harness) -> None:
    """Two ``ese ingest`` started together on a DAGSTER_HOME that does not exist yet."""
    ws = h.workspace()
    assert not ws.home.exists()
    procs = [ws.popen_ingest(), ws.popen_ingest()]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        print(f"ese ingest {proc.pid}:\n{out}\n{err}")  # shown on failure
        assert proc.returncode == 0, f"{out}\n{err}"
        assert "Traceback" not in err, err
    h.check(ws, ignore=ORDER_DEPENDENT)


def case_ingest_while_sensor_runs(h: Harness) -> None:
    """``ese ingest`` on the directory the sensor watches, while the sensor's runs execute."""
    ws = h.workspace()
    proc = ws.popen_ingest()
    try:
        with ws.instance() as instance:
            all_measured = ws.all_measured(h.names)
            ws.drive_sensor(
                instance, lambda: proc.poll() is not None and all_measured(), timeout=180
            )
    finally:
        out, err = proc.communicate(timeout=240)
    print(f"ese ingest:\n{out}\n{err}")  # shown on failure
    assert proc.returncode == 0, f"{out}\n{err}"
    assert "Traceback" not in err, err
    h.check(ws, ignore=ORDER_DEPENDENT)


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Harness], None]] = {
    "corrupt_fits": bad_file_case("corrupt_fits"),
    "truncated_fits": bad_file_case("truncated_fits"),
    "partial_transfer_name": case_partial_transfer_name,
    "still_being_written": case_still_being_written,
    "empty_file": bad_file_case("empty_file"),
    "gzip_file": bad_file_case("gzip_file"),
    "png_file": case_png_file,
    "table_only_fits": bad_file_case("table_only_fits"),
    "duplicate_copy": bad_file_case("duplicate_copy"),
    "symlinks": case_symlinks,
    "unreadable_then_readable": case_unreadable_then_readable,
    "nan_block": case_nan_block,
    "cube_nondegenerate": bad_file_case("cube_nondegenerate"),
    "missing_bmaj": bad_file_case("missing_bmaj"),
    "missing_time": bad_file_case("missing_time"),
    "no_wcs": bad_file_case("no_wcs"),
    "all_zero": bad_file_case("all_zero"),
    "dated_2099": case_dated_2099,
    "time_keywords_disagree": bad_file_case("time_keywords_disagree"),
    "bunit_kelvin": bad_file_case("bunit_kelvin"),
    "rewritten_in_place": case_rewritten_in_place,
    "truncated_then_completed": case_truncated_then_completed,
    "sigkill_ingest": case_sigkill_ingest,
    "sigkill_ingest_postgres": case_sigkill_ingest_postgres,
    "disk_full": case_disk_full,
    "broken_catalog": case_broken_catalog,
    "database_unreachable": case_database_unreachable,
    "sqlite_lock_during_ingest": case_sqlite_lock_during_ingest,
    "sqlite_lock_during_sensor_run": case_sqlite_lock_during_sensor_run,
    "pg_terminated_photometry": case_pg_terminated_photometry,
    "pg_terminated_statistics": case_pg_terminated_statistics,
    "run_failed_images_queued": case_run_failed_images_queued,
    "daemon_died_before_launch": case_daemon_died_before_launch,
    "two_ingests_new_home": case_two_ingests_new_home,
    "ingest_while_sensor_runs": case_ingest_while_sensor_runs,
}


def test_the_matrix_has_at_least_30_cases_and_the_docstring_lists_them():
    assert len(CASES) >= 30
    listed = re.findall(r"^([a-z0-9_]+)\s{2,}", __doc__, re.MULTILINE)
    assert listed == list(CASES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_fault(case_id: str, h: Harness) -> None:
    CASES[case_id](h)

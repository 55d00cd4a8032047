"""Lightcurve and η–V plots on a products database written by the real pipeline.

A small simulated survey (3 nights x 4 images, one deep ESE) runs through the Dagster job on a
test instance; the plots are then read back (the artists' data, the files written, the
materialization's metadata) and compared with independent SQL queries (sqlite3, not the storage
layer) and astropy time conversions.

Which sources the detection flags is not these tests' subject (the detection rules have tests of
their own): where a test needs candidates it flags them itself with plain SQL, as a person or
another run would have, and the expectations are read back from the database.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import sqlite3
import subprocess
import sys

import dagster as dg
import matplotlib.dates as mdates
import matplotlib.image as mpimg
import numpy as np
import pytest
from astropy import units as u
from astropy.time import Time

from ese_assets import api, plots
from ese_assets.core import ese_template
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.definitions import build_definitions
from ese_assets.storage.engine import dispose_engine
from ese_assets_tests.survey import NIGHTS, make_workspace

ESE_SOURCE = "J100007+294817"  # the injected ESE of SMALL_SURVEY (seed 7)
THUMBNAIL_LIMIT = 40_000


def run_nights(settings, nights, instance) -> None:
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    for night in nights:
        assert job.execute_in_process(partition_key=night, instance=instance).success


def candidates_event_metadata(instance) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey("ese_candidates"))
    return event.asset_materialization.metadata


@pytest.fixture(scope="module")
def survey_db(tmp_path_factory, small_survey):
    """(products database path, metadata of the last ese_candidates materialization)."""
    settings = make_workspace(tmp_path_factory.mktemp("plots"), small_survey)
    with dg.instance_for_test() as instance:
        run_nights(settings, NIGHTS, instance)
        metadata = candidates_event_metadata(instance)
    yield settings.products_db, metadata
    dispose_engine(settings.products_db)


@pytest.fixture
def db_copy(survey_db, tmp_path):
    """A private copy of the survey database (for tests that change it)."""
    path = tmp_path / "copy.sqlite3"
    # the backup API also copies committed pages still in the WAL file (a file copy would not)
    src, dst = sqlite3.connect(survey_db[0]), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    yield str(path)
    dispose_engine(str(path))


def sql(db: str, query: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        with conn:  # commits
            return conn.execute(query, params).fetchall()
    finally:
        conn.close()


OPEN = "status IN ('active', 'investigated')"


def flag_candidates(db: str, source_ids, status: str = "active") -> None:
    """Open a candidate (plain SQL) for each source that has none open; significance descending
    in the given order."""
    already = {r[0] for r in sql(db, f"SELECT source_id FROM ese_candidates WHERE {OPEN}")}
    for i, source_id in enumerate(source_ids):
        if source_id not in already:
            sql(
                db,
                "INSERT INTO ese_candidates (source_id, flagged_at, flagged_by, significance, "
                "flag_type, status) VALUES (?, 0, 'test', ?, 'dip', ?)",
                source_id,
                50.0 - i,
                status,
            )


def dismiss(db: str, source_id: str) -> None:
    sql(db, "UPDATE ese_candidates SET status = 'dismissed' WHERE source_id = ?", source_id)


def most_variable(db: str, n: int) -> list[str]:
    rows = sql(db, "SELECT source_id FROM variability_stats ORDER BY eta_metric DESC LIMIT ?", n)
    return [r[0] for r in rows]


def photometry_rows(db: str, source_id: str) -> np.ndarray:
    """(mjd, flux mJy, error mJy, quality_flag) of a source, in time order."""
    return np.array(
        sql(
            db,
            "SELECT mjd, peak_jyb * 1000, peak_err_jyb * 1000, quality_flag FROM photometry "
            "WHERE source_id = ? ORDER BY mjd",
            source_id,
        ),
        dtype=float,
    )


def artist(fig, gid: str):
    """The one artist of the figure's main axes with this gid (None if absent)."""
    ax = fig.axes[0]
    found = [a for a in (*ax.lines, *ax.patches, *ax.collections) if a.get_gid() == gid]
    assert len(found) <= 1, gid
    return found[0] if found else None


def points(fig, gid: str) -> np.ndarray:
    """(x, y) of a plotted data line, shape (n, 2); empty when absent."""
    line = artist(fig, gid)
    if line is None:
        return np.empty((0, 2))
    return np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)


def error_half_lengths(fig, gid: str) -> np.ndarray:
    """Half length of each vertical error bar of a series, in plot order."""
    bars = artist(fig, f"{gid}-errorbars")
    return np.array([abs(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()])


def span(fig, gid: str) -> tuple[float, float] | None:
    patch = artist(fig, gid)
    if patch is None:
        return None
    return patch.get_x(), patch.get_x() + patch.get_width()


def blended_source(db: str) -> str:
    return sql(db, "SELECT source_id FROM photometry WHERE quality_flag = 4 LIMIT 1")[0][0]


# --------------------------------------------------------------------------- Source.plot_lightcurve


@pytest.mark.parametrize("which", ["ese", "blended"])
def test_plotted_points_are_the_photometry_rows(survey_db, which):
    db = survey_db[0]
    source_id = ESE_SOURCE if which == "ese" else blended_source(db)
    fig = api.Source(source_id, db).plot_lightcurve()
    rows = photometry_rows(db, source_id)
    clean, flagged = rows[rows[:, 3] == 0], rows[rows[:, 3] != 0]
    np.testing.assert_allclose(points(fig, plots.GID_CLEAN), clean[:, :2], rtol=1e-12)
    np.testing.assert_allclose(error_half_lengths(fig, plots.GID_CLEAN), clean[:, 2], rtol=1e-9)
    # flagged measurements (blended: used by the statistics) are a separate series
    np.testing.assert_allclose(points(fig, plots.GID_FLAGGED), flagged[:, :2], rtol=1e-12)
    if which == "blended":
        assert len(flagged) > 0
        np.testing.assert_allclose(
            error_half_lengths(fig, plots.GID_FLAGGED), flagged[:, 2], rtol=1e-9
        )
    assert artist(fig, plots.GID_EXCLUDED) is None  # default exclusion: none stored


def test_baseline_is_the_first_ten_epochs_and_event_the_stored_window(survey_db):
    db = survey_db[0]
    fig = api.Source(ESE_SOURCE, db).plot_lightcurve()
    mjd = photometry_rows(db, ESE_SOURCE)[:, 0]
    assert len(mjd) > 10
    first, last = span(fig, plots.GID_BASELINE)
    assert first == mjd[0] and last == mjd[9]
    assert np.sum((mjd >= first) & (mjd <= last)) == 10
    flux = photometry_rows(db, ESE_SOURCE)[:10, 1]
    level = artist(fig, plots.GID_BASELINE_LEVEL).get_ydata()
    np.testing.assert_allclose(level, np.median(flux), rtol=1e-12)

    ((start, end, n_obs, dip_s),) = sql(
        db,
        "SELECT dip_start_mjd, dip_end_mjd, n_obs, dip_significance FROM variability_stats "
        "WHERE source_id = ?",
        ESE_SOURCE,
    )
    assert span(fig, plots.GID_EVENT) == (start, end)
    title = fig.axes[0].get_title()
    assert f"n_obs={n_obs}" in title and f"dip S={dip_s:.2f}" in title

    bare = api.Source(ESE_SOURCE, db).plot_lightcurve(
        highlight_baseline=False, highlight_ese_period=False
    )
    assert span(bare, plots.GID_BASELINE) is None and span(bare, plots.GID_EVENT) is None
    # the top axis shows calendar dates of the MJD axis
    secondary = [c for c in fig.axes[0].child_axes]
    assert len(secondary) == 1
    assert plots.mjd_to_datenum(mjd[0]) == pytest.approx(
        mdates.date2num(Time(mjd[0], format="mjd").datetime), abs=1e-9
    )


def test_event_span_follows_the_stored_window_and_title_the_candidate(db_copy):
    mjd = photometry_rows(db_copy, ESE_SOURCE)[:, 0]
    sql(
        db_copy,
        "UPDATE variability_stats SET dip_start_mjd = ?, dip_end_mjd = ?, "
        "dip_significance = -7.5 WHERE source_id = ?",
        mjd[4],
        mjd[7],
        ESE_SOURCE,
    )
    sql(db_copy, "DELETE FROM ese_candidates WHERE source_id = ?", ESE_SOURCE)
    flag_candidates(db_copy, [ESE_SOURCE], status="investigated")
    fig = api.Source(ESE_SOURCE, db_copy).plot_lightcurve()
    assert span(fig, plots.GID_EVENT) == (mjd[4], mjd[7])  # the event, not the whole span
    assert "candidate investigated (dip, significance 50.0)" in fig.axes[0].get_title()
    assert "dip window" in artist(fig, plots.GID_EVENT).get_label()
    sql(db_copy, "UPDATE variability_stats SET dip_significance = 7.5")
    fig = api.Source(ESE_SOURCE, db_copy).plot_lightcurve()
    assert "spike window" in artist(fig, plots.GID_EVENT).get_label()
    sql(db_copy, "UPDATE variability_stats SET dip_start_mjd = NULL, dip_end_mjd = NULL")
    assert span(api.Source(ESE_SOURCE, db_copy).plot_lightcurve(), plots.GID_EVENT) is None


def test_flagged_and_excluded_epochs_and_the_baseline_skips_excluded(db_copy):
    rows = photometry_rows(db_copy, ESE_SOURCE)
    sql(
        db_copy,
        "UPDATE photometry SET quality_flag = 2 WHERE source_id = ? AND mjd = ?",
        ESE_SOURCE,
        rows[1, 0],
    )
    fig = api.Source(ESE_SOURCE, db_copy).plot_lightcurve()
    np.testing.assert_allclose(points(fig, plots.GID_FLAGGED), rows[[1], :2])
    assert len(points(fig, plots.GID_CLEAN)) == len(rows) - 1
    assert span(fig, plots.GID_BASELINE) == (rows[0, 0], rows[9, 0])
    # when bit 2 is excluded from the statistics the point is drawn as excluded and the
    # baseline is the first 10 epochs the statistics use
    fig = api.Source(ESE_SOURCE, db_copy).plot_lightcurve(exclude_flags=2 | 1 | 8)
    np.testing.assert_allclose(points(fig, plots.GID_EXCLUDED), rows[[1], :2])
    assert artist(fig, plots.GID_FLAGGED) is None
    assert span(fig, plots.GID_BASELINE) == (rows[0, 0], rows[10, 0])


def test_save_png_pdf_and_default_name(survey_db, tmp_path, monkeypatch):
    db = survey_db[0]
    source = api.Source(ESE_SOURCE, db)
    png = tmp_path / "out" / "lc.png"
    source.plot_lightcurve(save=True, outfile=png)
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    pdf = tmp_path / "lc.pdf"
    source.plot_lightcurve(save=True, outfile=str(pdf))
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5000
    monkeypatch.chdir(tmp_path)
    source.plot_lightcurve(save=True)
    assert mpimg.imread(tmp_path / f"{ESE_SOURCE}_lightcurve.png").ndim == 3
    with pytest.raises(ValueError, match=r"\.jpg.*\.png, \.pdf"):
        source.plot_lightcurve(save=True, outfile=tmp_path / "lc.jpg")
    assert not (tmp_path / "lc.jpg").exists()
    with pytest.raises(ValueError, match="no measurements for source 'NVSS J000000"):
        api.Source("NVSS J000000+000000", db).plot_lightcurve()
    assert plots.default_lightcurve_path("NVSS J1234+56/x").name == "NVSS_J1234+56_x_lightcurve.png"


def test_normalized_fluxes(survey_db):
    db = survey_db[0]
    # the pipeline's calibration stored normalized fluxes: they are the plotted series, the raw
    # fluxes stay visible behind them
    lc = api.Source(ESE_SOURCE, db).measurements
    assert lc["normalized_flux_jy"].notna().all()
    fig = plots.lightcurve_figure(lc, None, use_normalized=True)
    rows = photometry_rows(db, ESE_SOURCE)
    norm = np.array(
        sql(
            db,
            "SELECT normalized_flux_jy * 1000, normalized_flux_err_jy * 1000 FROM photometry "
            "WHERE source_id = ? ORDER BY mjd",
            ESE_SOURCE,
        ),
        dtype=float,
    )
    clean = (rows[:, 3].astype(int) & DEFAULT_EXCLUDED_FLAGS) == 0
    np.testing.assert_allclose(points(fig, plots.GID_CLEAN)[:, 1], norm[clean, 0], rtol=1e-12)
    np.testing.assert_allclose(points(fig, plots.GID_RAW)[:, 1], rows[:, 1], rtol=1e-12)
    np.testing.assert_allclose(error_half_lengths(fig, plots.GID_CLEAN), norm[clean, 1])
    assert "normalized" in fig.axes[0].get_ylabel()
    # a lightcurve without them (another pipeline's table) is an error, never raw fluxes labelled
    # normalized
    with pytest.raises(ValueError, match="no normalized_flux_jy column"):
        plots.lightcurve_figure(
            lc.drop(columns=["normalized_flux_jy", "normalized_flux_err_jy"]),
            None,
            use_normalized=True,
        )
    with pytest.raises(ValueError, match="no measurement has a normalized_flux_jy"):
        plots.lightcurve_figure(lc.assign(normalized_flux_jy=np.nan), None, use_normalized=True)


def test_template_is_drawn_when_given(survey_db):
    lc = api.Source(ESE_SOURCE, survey_db[0]).measurements
    model_mjd = np.linspace(lc["mjd"].min(), lc["mjd"].max(), 50)
    model = 180 - 100 * np.exp(-(((model_mjd - 60677.15) / 0.2) ** 2))
    fig = plots.lightcurve_figure(lc, None, template=(model_mjd, model))
    np.testing.assert_array_equal(
        points(fig, plots.GID_TEMPLATE), np.column_stack([model_mjd, model])
    )
    # Source.plot_lightcurve draws its own fit only for an event: 3 nights are fewer than the
    # fit's MIN_NIGHTS, so nothing is fitted here (test_detect_products.py has the drawn case)
    assert len(NIGHTS) < ese_template.MIN_NIGHTS
    assert (
        artist(api.Source(ESE_SOURCE, survey_db[0]).plot_lightcurve(), plots.GID_TEMPLATE) is None
    )


# --------------------------------------------------------------------------- seed plot_lightcurve


def test_seed_plot_lightcurve(tmp_path):
    flux = np.array([1.2, 1.3, 0.8, 1.1])
    times = Time([60000, 60001, 60002, 60003], format="mjd")
    out = tmp_path / "3c286_lightcurve.pdf"
    fig = api.plot_lightcurve(
        flux=flux,
        times=times,
        errors=np.array([0.1, 0.1, 0.1, 0.1]),
        config=plots.FigureConfig(style=plots.PlotStyle.PUBLICATION),
        title="3C286 Lightcurve",
        output=str(out),
    )
    assert out.read_bytes()[:5] == b"%PDF-"
    np.testing.assert_array_equal(points(fig, plots.GID_CLEAN), np.column_stack([times.mjd, flux]))
    np.testing.assert_allclose(error_half_lengths(fig, plots.GID_CLEAN), 0.1)
    assert fig.axes[0].get_title() == "3C286 Lightcurve"
    assert fig.dpi == 300
    # Quantities label the axis with their unit; plain MJD numbers work as times
    fig = plots.plot_lightcurve(flux * u.mJy, [60000.0, 60001.0, 60002.0, 60003.0])
    assert fig.axes[0].get_ylabel() == "flux density (mJy)"
    with pytest.raises(ValueError, match="same length"):
        plots.plot_lightcurve(flux, times[:3])


# --------------------------------------------------------------------------- eta-V


def test_eta_v_highlights_exactly_the_open_candidates(db_copy, tmp_path):
    flagged = most_variable(db_copy, 7)
    flag_candidates(db_copy, flagged)
    dismissed = flagged[-1]
    dismiss(db_copy, dismissed)
    out = tmp_path / "eta_v.png"
    fig = api.plot_eta_v(db_copy, out)
    assert mpimg.imread(out).ndim == 3

    def log_eta_v(where: str) -> np.ndarray:
        rows = np.array(
            sql(db_copy, f"SELECT eta_metric, v_index FROM variability_stats WHERE {where}"),
            dtype=float,
        )
        logs = np.log10(rows)
        return logs[np.argsort(logs[:, 0])]

    open_q = f"source_id IN (SELECT source_id FROM ese_candidates WHERE {OPEN})"
    expected = log_eta_v(open_q)
    assert len(expected) >= 6
    got = points(fig, plots.GID_CANDIDATES)
    np.testing.assert_allclose(got[np.argsort(got[:, 0])], expected, rtol=1e-12)
    population = points(fig, plots.GID_POPULATION)
    rest = log_eta_v(f"NOT {open_q}")
    np.testing.assert_allclose(population[np.argsort(population[:, 0])], rest, rtol=1e-12)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert dismissed not in labels and flagged[0] in labels


# --------------------------------------------------------------------------- CLI


def ese(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ese_assets.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_plot(survey_db, tmp_path):
    db = survey_db[0]
    png, pdf, etav = tmp_path / "lc.png", tmp_path / "lc.pdf", tmp_path / "ev.pdf"
    for out in (png, pdf):
        done = ese("plot", ESE_SOURCE, "--output", str(out), "--products-db", db)
        assert done.returncode == 0, done.stderr
        assert str(out) in done.stdout
    assert mpimg.imread(png).ndim == 3
    assert pdf.read_bytes()[:5] == b"%PDF-"
    done = ese("plot", "--eta-v", "--output", str(etav), "--products-db", db)
    assert done.returncode == 0, done.stderr
    assert etav.read_bytes()[:5] == b"%PDF-"
    done = ese("plot", "NOT A SOURCE", "--products-db", db)
    assert done.returncode == 2
    assert done.stderr.strip() == "ese plot: no measurements for source 'NOT A SOURCE'"
    done = ese(
        "plot", ESE_SOURCE, "--normalized", "--output", str(tmp_path / "n.png"), "--products-db", db
    )
    assert done.returncode == 0, done.stderr
    assert mpimg.imread(tmp_path / "n.png").ndim == 3
    done = ese(
        "plot",
        ESE_SOURCE,
        "--no-template",
        "--output",
        str(tmp_path / "t.png"),
        "--products-db",
        db,
    )
    assert done.returncode == 0, done.stderr
    assert mpimg.imread(tmp_path / "t.png").ndim == 3
    assert ese("plot", "--products-db", db).returncode == 2
    missing = tmp_path / "typo.sqlite3"  # a read command never creates an empty database
    done = ese("plot", ESE_SOURCE, "--products-db", str(missing))
    assert done.returncode == 2 and str(missing) in done.stderr and not missing.exists()


# --------------------------------------------------------------------------- asset metadata


def pngs_in(markdown: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    ]


def iso_minute(mjd: float) -> str:
    when = Time(mjd, format="mjd", scale="utc").datetime + dt.timedelta(seconds=30)
    return when.strftime("%Y-%m-%d %H:%M")


def check_candidates_metadata(db: str, metadata: dict, n_plots: int) -> None:
    table = metadata["top_candidates"]
    names = [c.name for c in table.schema.columns]
    for column in (
        "ra_deg",
        "dec_deg",
        "dip_start",
        "dip_end",
        "dip_depth_frac",
        "flag_type",
        "status",
    ):
        assert column in names
    rows = [r.data for r in table.records]
    expected = sql(
        db,
        "SELECT e.source_id, e.status, e.flag_type, v.ra_deg, v.dec_deg, v.dip_start_mjd, "
        "v.dip_end_mjd, v.dip_depth_frac FROM ese_candidates e JOIN variability_stats v "
        f"ON v.source_id = e.source_id WHERE e.{OPEN} ORDER BY e.significance DESC LIMIT 10",
    )
    assert [r["source_id"] for r in rows] == [e[0] for e in expected]
    for row, (_, status, flag_type, ra, dec, start, end, depth) in zip(rows, expected, strict=True):
        assert (row["status"], row["flag_type"]) == (status, flag_type)
        assert row["ra_deg"] == pytest.approx(ra, abs=1e-5)
        assert row["dec_deg"] == pytest.approx(dec, abs=1e-5)
        assert row["dip_start"] == iso_minute(start) and row["dip_end"] == iso_minute(end)
        assert row["dip_depth_frac"] == pytest.approx(depth, abs=1e-3)
    markdown = metadata["top_candidate_plots"].value
    images = pngs_in(markdown)
    assert len(images) == n_plots
    for (sid, *_), png in zip(expected, images, strict=False):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) <= THUMBNAIL_LIMIT
        assert mpimg.imread(io.BytesIO(png), format="png").shape[1] >= 300
        assert f"**{sid}**" in markdown


def test_candidates_materialization_of_the_survey(survey_db):
    db, metadata = survey_db
    n_open = sql(db, f"SELECT count(*) FROM ese_candidates WHERE {OPEN}")[0][0]
    assert metadata["open_candidates"].value == n_open
    if n_open:
        check_candidates_metadata(db, metadata, n_plots=min(5, n_open))
    else:
        assert "top_candidates" not in metadata and "top_candidate_plots" not in metadata


def test_candidates_materialization_has_plots_and_columns(db_copy, small_survey, tmp_path):
    # "investigated": a person's decision, which a detection run does not change
    flagged = most_variable(db_copy, 8)
    flag_candidates(db_copy, flagged, status="investigated")
    dismiss(db_copy, flagged[2])
    # the night's images are re-measured from the registered paths (the module's workspace)
    settings = make_workspace(tmp_path, small_survey, products_db=db_copy, copy_images=False)
    with dg.instance_for_test() as instance:
        run_nights(settings, NIGHTS[-1:], instance)
        metadata = candidates_event_metadata(instance)
    n_open = sql(db_copy, f"SELECT count(*) FROM ese_candidates WHERE {OPEN}")[0][0]
    assert n_open >= 7 and metadata["open_candidates"].value == n_open
    check_candidates_metadata(db_copy, metadata, n_plots=5)

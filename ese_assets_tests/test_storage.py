"""Storage layer tests, run on SQLite and PostgreSQL through the parametrized ``engine`` fixture."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import sqlalchemy as sa

from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import (
    describe_url,
    dispose_engine,
    ensure_schema,
    make_engine,
    normalize_url,
)
from ese_assets.storage.schema import ese_candidates, photometry
from ese_assets_tests import snapshots

NIGHTS = ("2026-01-01", "2026-01-02", "2026-01-03")


def _image(path: str, night: str = NIGHTS[0], mjd: float = 61041.1, **extra) -> dict:
    return {
        "path": path,
        "night": night,
        "mjd": mjd,
        "beam_maj_deg": 0.01,
        "beam_min_deg": 0.008,
        "beam_pa_deg": 30.0,
        "freq_hz": 1.4e9,
        **extra,
    }


def _rows(source_ids, mjd: float, seed: int = 0) -> pd.DataFrame:
    """Photometry rows as the photometry asset would produce them (numpy dtypes, no image_path)."""
    rng = np.random.default_rng(seed)
    n = len(source_ids)
    return pd.DataFrame(
        {
            "source_id": list(source_ids),
            "ra_deg": rng.uniform(0.0, 360.0, n),
            "dec_deg": rng.uniform(-30.0, 80.0, n),
            "nvss_flux_mjy": rng.uniform(10.0, 500.0, n),
            "peak_jyb": rng.normal(0.1, 0.01, n),
            "peak_err_jyb": np.full(n, 1e-3),
            "mjd": np.full(n, mjd),
            "local_rms_jyb": np.full(n, 1e-3),
            "background_jyb": np.zeros(n),
            "quality_flag": np.zeros(n, dtype=np.int64),
        }
    )


def _measure(engine, path: str, source_ids, night: str, mjd: float, seed: int = 0) -> pd.DataFrame:
    images_db.register_images(engine, [_image(path, night=night, mjd=mjd)])
    rows = _rows(source_ids, mjd, seed)
    photometry_db.replace_image_photometry(
        engine, path, rows, {"n_sources": len(rows), "median_rms_jyb": np.float64(1e-3)}
    )
    return rows


def _stats(source_ids, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(source_ids)
    return pd.DataFrame(
        {
            "source_id": list(source_ids),
            "ra_deg": rng.uniform(0.0, 360.0, n),
            "dec_deg": rng.uniform(-30.0, 80.0, n),
            "nvss_flux_mjy": rng.uniform(10.0, 500.0, n),
            "n_obs": np.arange(n, dtype=np.int64) + 3,
            "mean_flux_mjy": rng.uniform(10.0, 500.0, n),
            "std_flux_mjy": rng.uniform(0.1, 5.0, n),
            "chi2_nu": rng.uniform(0.5, 3.0, n),
            "eta_metric": rng.uniform(0.5, 3.0, n),
            "last_mjd": np.full(n, 61045.0),
            "dip_n_epochs": np.full(n, 2, dtype=np.int64),
            "dip_significance": np.where(np.arange(n) % 2 == 0, np.nan, -4.0),  # NaN -> NULL
            "not_a_column": np.ones(n),  # ignored by the upsert
        }
    )


# --------------------------------------------------------------------------------------------------
# engine.py
# --------------------------------------------------------------------------------------------------


def test_make_engine_sqlite_path_creates_dirs_and_sets_pragmas(tmp_path, monkeypatch):
    monkeypatch.setenv("ESE_DB_BUSY_TIMEOUT_S", "2.5")
    path = tmp_path / "a" / "b" / "products.sqlite3"
    engine = make_engine(str(path))
    try:
        assert engine is make_engine(str(path))  # cached per (url, pid): one pool per process
        assert normalize_url(str(path)) == f"sqlite:///{path}"
        ensure_schema(engine)
        ensure_schema(engine)  # idempotent
        assert path.exists()
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
        assert pragma == {
            "journal_mode": "wal",
            "busy_timeout": 2500,
            "foreign_keys": 1,
            "synchronous": 1,
        }  # 1 = NORMAL
        assert set(sa.inspect(engine).get_table_names()) == {
            "images",
            "photometry",
            "variability_stats",
            "ese_candidates",
            "ese_candidate_history",
            "source_night_sums",
            "source_sums",
            "image_gains",
            "calibration_references",
        }
    finally:
        dispose_engine(str(path))


def test_make_engine_postgres_url_uses_psycopg_and_pre_ping():
    engine = make_engine("postgresql://ese:secret@db.example.org:5432/products")
    try:
        assert engine.dialect.driver == "psycopg"
        assert engine.pool._pre_ping
    finally:
        dispose_engine("postgresql://ese:secret@db.example.org:5432/products")


def test_describe_url_masks_password():
    text = describe_url("postgresql+psycopg://ese:s3cr%40t@db.example.org/products")
    assert "s3cr" not in text and "***" in text and "db.example.org/products" in text
    assert describe_url("/data/products.sqlite3") == "/data/products.sqlite3"


def test_db_url_gives_an_empty_private_database(db_url):
    engine = make_engine(db_url)
    assert sa.inspect(engine).get_table_names() == []
    ensure_schema(engine)
    assert images_db.register_images(engine, [_image("/in/a.fits")]) == 1
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:  # a per-test schema, never the shared "public" one
            assert conn.execute(sa.text("SELECT current_schema()")).scalar().startswith("t_")


def test_foreign_keys_enforced(engine):
    with pytest.raises(sa.exc.IntegrityError):
        candidates_db.apply_candidate_changes(
            engine, [{"source_id": "J000000+000000", "significance": 5.0, "flag_type": "dip"}], []
        )


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def test_register_images_ignores_known_paths(engine):
    assert images_db.register_images(engine, [_image("/in/a.fits"), _image("/in/b.fits")]) == 2
    # Re-registering a known path (with other values) inserts nothing and leaves the row untouched.
    changed = _image("/in/a.fits", mjd=99999.0, status="rejected", reason="x")
    assert (
        images_db.register_images(engine, [changed, _image("/in/c.fits"), _image("/in/c.fits")])
        == 1
    )
    assert images_db.known_image_paths(engine, ["/in/a.fits", "/in/c.fits", "/in/zz.fits"]) == {
        "/in/a.fits",
        "/in/c.fits",
    }
    night = images_db.night_images(engine, NIGHTS[0])
    row_a = night.set_index("path").loc["/in/a.fits"]
    assert row_a["mjd"] == 61041.1 and row_a["status"] == "pending"
    assert list(images_db.pending_images(engine).columns) == ["path", "night"]
    assert list(images_db.pending_images(engine)["path"]) == [
        "/in/a.fits",
        "/in/b.fits",
        "/in/c.fits",
    ]

    assert images_db.set_image_status(engine, ["/in/a.fits", "/in/b.fits"], "queued") == 2
    assert list(images_db.pending_images(engine)["path"]) == ["/in/c.fits"]
    images_db.mark_image_failed(engine, "/in/c.fits", "boom")
    counts = images_db.image_counts_by_status(engine)
    assert counts == {"pending": 0, "queued": 2, "measured": 0, "failed": 1, "rejected": 0}
    assert images_db.image_counts_by_status(engine, night="1999-01-01")["queued"] == 0
    assert images_db.night_images(engine, NIGHTS[0], statuses=("failed",))["reason"].tolist() == [
        "boom"
    ]
    with pytest.raises(ValueError, match="invalid image status"):
        images_db.set_image_status(engine, ["/in/a.fits"], "done")
    with pytest.raises(ValueError, match="unknown images column"):
        images_db.register_images(engine, [{"path": "/in/d.fits", "bmaj": 1.0}])


def test_rejected_images_filters(engine):
    images_db.register_images(
        engine,
        [
            _image(
                "/in/bad1.fits", status="rejected", reason="not a FITS file", registered_at=100.0
            ),
            _image(
                "/in/bad2.fits",
                night=NIGHTS[1],
                status="rejected",
                reason="missing beam keyword BMAJ",
                registered_at=200.0,
            ),
            _image("/in/good.fits", registered_at=150.0),
        ],
    )
    everything = images_db.rejected_images(engine)
    assert list(everything.columns) == ["path", "night", "reason", "registered_at"]
    assert everything["path"].tolist() == ["/in/bad2.fits", "/in/bad1.fits"]
    assert images_db.rejected_images(engine, night=NIGHTS[0])["reason"].tolist() == [
        "not a FITS file"
    ]
    assert images_db.rejected_images(engine, since=150.0)["path"].tolist() == ["/in/bad2.fits"]


def test_known_paths_and_lightcurves_chunk_long_in_lists(engine):
    paths = [f"/in/img_{i:05d}.fits" for i in range(1203)]
    assert images_db.register_images(engine, [_image(p) for p in paths]) == 1203
    assert images_db.known_image_paths(engine, [*paths, "/in/none.fits"]) == set(paths)
    sources = [f"S{i:05d}" for i in range(1203)]
    _measure(engine, "/in/img_00000.fits", sources, NIGHTS[0], 61041.1)
    wanted = [*sources[::-1], "missing"]
    curves = photometry_db.lightcurves(engine, wanted)
    assert curves["source_id"].tolist() == sources  # ordered by source_id across chunks
    assert len(statistics_db.variability_stats(engine, wanted)) == 0


# --------------------------------------------------------------------------------------------------
# photometry
# --------------------------------------------------------------------------------------------------


def test_replace_image_photometry_twice_gives_same_rows(engine):
    sources = [f"J0{i:05d}+450000" for i in range(50)]
    _measure(engine, "/in/a.fits", sources, NIGHTS[0], 61041.1, seed=1)
    first = snapshots.table_snapshot(engine, "photometry")
    first_images = snapshots.table_snapshot(engine, "images")
    _measure(engine, "/in/a.fits", sources, NIGHTS[0], 61041.1, seed=1)
    pdt.assert_frame_equal(snapshots.table_snapshot(engine, "photometry"), first)
    pdt.assert_frame_equal(snapshots.table_snapshot(engine, "images"), first_images)
    assert photometry_db.photometry_counts(engine) == 50
    image = images_db.night_images(engine, NIGHTS[0]).iloc[0]
    assert image["status"] == "measured" and image["n_sources"] == 50
    assert image["measured_at"] > 0 and image["median_rms_jyb"] == 1e-3

    # Re-measuring with fewer sources replaces (does not append to) the image's rows.
    photometry_db.replace_image_photometry(engine, "/in/a.fits", _rows(sources[:10], 61041.1), {})
    assert photometry_db.photometry_counts(engine) == 10
    curves = photometry_db.lightcurves(engine)
    assert list(curves.columns) == list(photometry_db.LIGHTCURVE_COLUMNS)
    assert curves["source_id"].tolist() == sorted(sources[:10])
    assert curves["quality_flag"].dtype == np.int64 and curves["mjd"].dtype == np.float64


def test_replace_image_photometry_requires_registered_image(engine):
    with pytest.raises(ValueError, match="not registered"):
        photometry_db.replace_image_photometry(
            engine, "/in/unknown.fits", _rows(["S1"], 61041.1), {}
        )
    assert photometry_db.photometry_counts(engine) == 0


def test_unique_image_source_enforced_by_database(engine):
    _measure(engine, "/in/a.fits", ["S1", "S2"], NIGHTS[0], 61041.1)
    duplicate = {
        "image_path": "/in/a.fits",
        "source_id": "S1",
        "ra_deg": 1.0,
        "dec_deg": 2.0,
        "peak_jyb": 0.1,
        "measured_at": 1.0,
        "mjd": 61041.1,
    }
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(photometry.insert(), [duplicate])
    # The same source twice in one image's rows is rejected as a whole.
    with pytest.raises(sa.exc.IntegrityError):
        photometry_db.replace_image_photometry(
            engine, "/in/a.fits", _rows(["S3", "S3"], 61041.1), {}
        )
    assert sorted(photometry_db.lightcurves(engine)["source_id"]) == ["S1", "S2"]


def test_replace_image_photometry_is_atomic(engine):
    sources = [f"S{i:03d}" for i in range(20)]
    _measure(engine, "/in/a.fits", sources, NIGHTS[0], 61041.1, seed=1)
    images_db.set_image_status(engine, ["/in/a.fits"], "queued")
    before = snapshots.table_snapshot(engine, "photometry", exclude=())
    image_before = snapshots.table_snapshot(engine, "images", exclude=())

    bad = _rows(sources, 61041.1, seed=2)
    bad.loc[12, "peak_jyb"] = np.nan  # NOT NULL violated half-way through the bulk insert
    with pytest.raises(sa.exc.IntegrityError):
        photometry_db.replace_image_photometry(engine, "/in/a.fits", bad, {"n_sources": 999})

    pdt.assert_frame_equal(snapshots.table_snapshot(engine, "photometry", exclude=()), before)
    image_after = snapshots.table_snapshot(engine, "images", exclude=())
    pdt.assert_frame_equal(image_after, image_before)
    assert image_after.loc[0, "status"] == "queued" and image_after.loc[0, "n_sources"] == 20


def test_lightcurves_for_nights_returns_full_history(engine):
    # A: nights 1 and 2; B: nights 2 and 3; C: night 3 only.
    _measure(engine, "/in/n1.fits", ["A"], NIGHTS[0], 61041.2)
    _measure(engine, "/in/n2.fits", ["B", "A"], NIGHTS[1], 61042.2)
    _measure(engine, "/in/n3.fits", ["C", "B"], NIGHTS[2], 61043.2)
    _measure(engine, "/in/n3b.fits", ["B"], NIGHTS[2], 61043.1)

    assert photometry_db.sources_measured_in_nights(engine, [NIGHTS[0]]) == ["A"]
    assert photometry_db.sources_measured_in_nights(engine, [NIGHTS[2], NIGHTS[0]]) == [
        "A",
        "B",
        "C",
    ]
    assert photometry_db.sources_measured_in_nights(engine, ["2030-01-01"]) == []

    night1 = photometry_db.lightcurves_for_nights(engine, [NIGHTS[0]])
    assert list(night1.columns) == list(photometry_db.LIGHTCURVE_COLUMNS)
    assert night1[["source_id", "mjd"]].values.tolist() == [["A", 61041.2], ["A", 61042.2]]

    night3 = photometry_db.lightcurves_for_nights(engine, [NIGHTS[2]])
    assert night3[["source_id", "image_path"]].values.tolist() == [
        ["B", "/in/n2.fits"],
        ["B", "/in/n3b.fits"],
        ["B", "/in/n3.fits"],
        ["C", "/in/n3.fits"],
    ]
    pdt.assert_frame_equal(night3, photometry_db.lightcurves(engine, ["B", "C"]))
    assert len(photometry_db.lightcurves_for_nights(engine, [])) == 0

    assert photometry_db.photometry_counts(engine) == 6
    assert [photometry_db.photometry_counts(engine, night=n) for n in NIGHTS] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------
# variability_stats
# --------------------------------------------------------------------------------------------------


def test_upsert_variability_stats_twice_is_identical(engine):
    sources = [f"S{i:03d}" for i in range(30)]
    stats = _stats(sources)
    assert (
        statistics_db.upsert_variability_stats(engine, stats.sample(frac=1.0, random_state=3)) == 30
    )
    first = snapshots.table_snapshot(engine, "variability_stats")
    assert statistics_db.upsert_variability_stats(engine, stats) == 30
    pdt.assert_frame_equal(snapshots.table_snapshot(engine, "variability_stats"), first)

    read = statistics_db.variability_stats(engine)
    assert read["source_id"].tolist() == sources
    assert read["dip_significance"].isna().sum() == 15  # NaN stored as NULL, read back as NaN
    assert "not_a_column" not in read.columns
    assert read["n_obs"].dtype == np.int64

    # A second upsert updates the given columns of existing rows and inserts new sources.
    changed = stats.iloc[:2].assign(mean_flux_mjy=[1.0, 2.0])
    new = _stats(["S999"], seed=5)
    statistics_db.upsert_variability_stats(engine, pd.concat([changed, new]))
    read = statistics_db.variability_stats(engine, ["S000", "S001", "S999", "S002"])
    assert read["mean_flux_mjy"].tolist()[:2] == [1.0, 2.0]
    assert read["source_id"].tolist() == ["S000", "S001", "S002", "S999"]
    assert (
        len(statistics_db.variability_stats(engine, min_n_obs=30)) == 3
    )  # n_obs 30, 31, 32 (and S999: 3)
    with pytest.raises(ValueError, match="duplicate source_id"):
        statistics_db.upsert_variability_stats(engine, pd.concat([new, new]))


# --------------------------------------------------------------------------------------------------
# ese_candidates
# --------------------------------------------------------------------------------------------------


def _flag(source_id: str, significance: float = 5.0, **extra) -> dict:
    return {
        "source_id": source_id,
        "significance": significance,
        "flag_type": "dip",
        "night": NIGHTS[0],
        **extra,
    }


def test_at_most_one_open_candidate_per_source(engine):
    statistics_db.upsert_variability_stats(engine, _stats(["S1", "S2"]))
    candidates_db.apply_candidate_changes(engine, [_flag("S1"), _flag("S2")], [])
    with pytest.raises(sa.exc.IntegrityError):
        candidates_db.apply_candidate_changes(engine, [_flag("S1", status="investigated")], [])
    # Bypassing the storage functions: the index still holds.
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            ese_candidates.insert(),
            [{"source_id": "S2", "flagged_at": 1.0, "significance": 3.0, "flag_type": "dip"}],
        )
    assert len(candidates_db.candidates(engine)) == 2  # the failed calls left nothing behind

    # Closing the open candidate and opening a new one in one call is allowed (updates first).
    old = candidates_db.existing_candidates(engine, ["S1"])
    assert list(old.columns) == [
        "id",
        "source_id",
        "status",
        "significance",
        "dismissed_at",
        "flagged_at",
        "last_night",
        "flag_type",
        "sigma_deviation",
        "dip_significance",
    ]
    candidates_db.apply_candidate_changes(
        engine,
        [_flag("S1", significance=7.0)],
        [{"id": int(old.loc[0, "id"]), "status": "dismissed", "dismissed_at": 10.0}],
    )
    # Dismissed candidates do not count: several may exist per source.
    candidates_db.set_candidate_status(engine, "S1", "dismissed")
    history = candidates_db.existing_candidates(engine, ["S1"])
    assert history["status"].tolist() == ["dismissed", "dismissed"]
    assert history["significance"].tolist() == [5.0, 7.0]


def test_set_candidate_status_workflow(engine):
    statistics_db.upsert_variability_stats(engine, _stats(["S1", "S2"]))
    candidates_db.apply_candidate_changes(engine, [_flag("S1", 6.0), _flag("S2", 4.0)], [])
    shown = candidates_db.candidates(engine, status="active")
    assert shown["source_id"].tolist() == ["S1", "S2"]  # most significant first
    for column in candidates_db.CANDIDATE_STATS_COLUMNS:
        assert column in shown.columns
    assert shown["n_obs"].tolist() == [3, 4]

    cid = candidates_db.set_candidate_status(
        engine, "S1", "investigated", notes="looks like a dip", by="alice"
    )
    row = candidates_db.candidates(engine, source_ids=["S1"]).iloc[0]
    assert row["id"] == cid and row["status"] == "investigated"
    assert row["investigated_at"] > 0 and pd.isna(row["dismissed_at"])
    assert row["notes"].endswith("alice: investigated: looks like a dip")

    assert (
        candidates_db.set_candidate_status(engine, "S1", "dismissed", notes="RFI", by="bob") == cid
    )
    row = candidates_db.candidates(engine, source_ids=["S1"]).iloc[0]
    assert row["status"] == "dismissed" and row["dismissed_at"] >= row["investigated_at"]
    assert row["notes"].splitlines()[0].endswith("looks like a dip")
    assert row["notes"].splitlines()[1].endswith("bob: dismissed: RFI")

    with pytest.raises(ValueError, match="no open"):
        candidates_db.set_candidate_status(engine, "S1", "dismissed")
    with pytest.raises(ValueError, match="no open"):
        candidates_db.set_candidate_status(engine, "nope", "investigated")
    with pytest.raises(ValueError, match="invalid candidate status"):
        candidates_db.set_candidate_status(engine, "S2", "active")
    assert candidates_db.candidates(engine, status=["active", "investigated"])[
        "source_id"
    ].tolist() == ["S2"]
    assert candidates_db.candidates(engine, status="dismissed")["source_id"].tolist() == ["S1"]
    with pytest.raises(ValueError, match="invalid candidate status"):
        candidates_db.candidates(engine, status="open")


def test_candidate_writes_keep_their_history(engine):
    """Every way of changing ese_candidates writes its history entry in the same transaction."""
    from ese_assets.storage import candidate_history as history_db

    statistics_db.upsert_variability_stats(engine, _stats(["S1", "S2"]))
    candidates_db.apply_candidate_changes(engine, [_flag("S1"), _flag("S2", 6.0)], [])
    [s1] = candidates_db.existing_candidates(engine, ["S1"])["id"].tolist()
    candidates_db.apply_candidate_changes(engine, [], [{"id": s1, "status": "expired"}])
    with pytest.raises(sa.exc.IntegrityError):  # a second open S2: nothing of the call is kept
        candidates_db.apply_candidate_changes(
            engine, [_flag("S2", 7.0)], [{"id": s1, "status": "active"}]
        )
    history = history_db.candidate_history(engine)
    changes = history[["source_id", "old_status", "new_status"]].fillna("-").values.tolist()
    assert changes == [["S1", "-", "active"], ["S2", "-", "active"], ["S1", "active", "expired"]]
    assert history["previous"].iloc[2] is not None and history["changed_by"].eq("auto").all()
    assert candidates_db.candidates(engine, status="expired")["source_id"].tolist() == ["S1"]
    assert len(history_db.candidate_history(engine, source_ids=["S2"])) == 1


# --------------------------------------------------------------------------------------------------
# Bound parameters
# --------------------------------------------------------------------------------------------------


def test_awkward_strings_are_bound_parameters(engine):
    path = '/in/o\'brien; DROP TABLE images; --"x".fits'
    source = "J000000+000000'); DELETE FROM photometry; --"
    _measure(engine, path, [source, "plain"], NIGHTS[0], 61041.1)
    assert images_db.known_image_paths(engine, [path]) == {path}
    assert photometry_db.lightcurves(engine, [source])["image_path"].tolist() == [path]
    assert photometry_db.lightcurves_for_nights(engine, [NIGHTS[0]])["source_id"].tolist() == [
        source,
        "plain",
    ]
    statistics_db.upsert_variability_stats(engine, _stats([source]))
    candidates_db.apply_candidate_changes(engine, [_flag(source)], [])
    candidates_db.set_candidate_status(
        engine, source, "investigated", notes="it's; fine", by="o'neil"
    )
    assert (
        candidates_db.candidates(engine, source_ids=[source])["notes"]
        .iloc[0]
        .endswith("o'neil: investigated: it's; fine")
    )
    images_db.mark_image_failed(engine, path, "reason with 'quotes'; and semicolons")
    assert images_db.night_images(engine, NIGHTS[0])["reason"].tolist() == [
        "reason with 'quotes'; and semicolons"
    ]
    assert photometry_db.photometry_counts(engine) == 2
    assert set(sa.inspect(engine).get_table_names()) >= {"images", "photometry"}


def test_table_snapshot_is_deterministic(engine):
    _measure(engine, "/in/b.fits", ["S2", "S1"], NIGHTS[1], 61042.1)
    _measure(engine, "/in/a.fits", ["S1", "S2"], NIGHTS[0], 61041.1)
    snap = snapshots.table_snapshot(engine, "photometry")
    assert "id" not in snap.columns and "measured_at" not in snap.columns
    assert snap[["image_path", "source_id"]].values.tolist() == [
        ["/in/a.fits", "S1"],
        ["/in/a.fits", "S2"],
        ["/in/b.fits", "S1"],
        ["/in/b.fits", "S2"],
    ]
    with pytest.raises(ValueError, match="unknown table"):
        snapshots.table_snapshot(engine, "images; DROP TABLE images")


# --------------------------------------------------------------------------------------------------
# Concurrency (SQLite: WAL + busy timeout + BEGIN IMMEDIATE)
# --------------------------------------------------------------------------------------------------


def test_sqlite_concurrent_writers_do_not_fail(sqlite_engine):
    engine = sqlite_engine
    sources = [f"S{i:03d}" for i in range(100)]
    n_iterations = 10
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def writer(name: str) -> None:
        try:
            start.wait()
            for i in range(n_iterations):
                path = f"/in/{name}_{i:02d}.fits"
                _measure(engine, path, sources, NIGHTS[0], 61041.0 + i, seed=i)
                statistics_db.upsert_variability_stats(engine, _stats(sources, seed=i))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(n_iterations):
                photometry_db.lightcurves_for_nights(engine, [NIGHTS[0]])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("w1", "w2")]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert images_db.image_counts_by_status(engine)["measured"] == 2 * n_iterations
    assert photometry_db.photometry_counts(engine) == 2 * n_iterations * len(sources)


# --------------------------------------------------------------------------------------------------
# Summaries used by the asset checks and the sensor
# --------------------------------------------------------------------------------------------------


def test_summaries_for_checks_and_sensor(engine):
    _measure(engine, "/in/n1.fits", ["A", "B"], NIGHTS[0], 61041.2)
    _measure(engine, "/in/n2.fits", ["B", "C"], NIGHTS[1], 61042.2)
    images_db.register_images(
        engine,
        [
            _image("/in/n2b.fits", night=NIGHTS[1], mjd=61042.3, ra_center_deg=10.0),
            _image("/in/bad.fits", night=NIGHTS[1], mjd=61042.25, status="rejected", reason="x"),
        ],
    )
    rows = _rows(["D", "E"], 61042.3)
    rows.loc[0, "peak_err_jyb"] = 0.0
    rows.loc[1, "quality_flag"] = 4
    photometry_db.replace_image_photometry(engine, "/in/n2b.fits", rows, {})

    assert images_db.image_counts_by_status(engine, nights=[NIGHTS[1], "2030-01-01"]) == {
        "pending": 0,
        "queued": 0,
        "measured": 2,
        "failed": 0,
        "rejected": 1,
    }
    assert images_db.image_counts_by_status(engine, NIGHTS[0])["measured"] == 1
    near = images_db.images_near_mjd(engine, 61042.0, 61042.29)
    assert near["path"].tolist() == ["/in/n2.fits"]  # rejected images are not duplicates' twins
    assert photometry_db.measured_source_ids(engine) == ["A", "B", "C", "D", "E"]
    assert photometry_db.night_photometry_summary(engine, [NIGHTS[1]]) == {
        "n_images": 2,
        "n_sources": 4,
        "n_rows": 4,
        "n_bad_errors": 1,
        "n_flagged": 1,
    }
    assert photometry_db.night_photometry_summary(engine, [])["n_rows"] == 0

    stats = _stats(["A", "B", "C"]).assign(n_obs=[1, 2, 5])
    statistics_db.upsert_variability_stats(engine, stats)
    # C: 5 != 1 row; D: no statistics row; Z: neither (consistent).
    assert statistics_db.stats_photometry_mismatches(engine, ["A", "B", "C", "D", "Z"]) == 2

    assert candidates_db.candidate_problems(engine) == []
    candidates_db.apply_candidate_changes(engine, [_flag("A", significance=-1.0), _flag("B")], [])
    problems = candidates_db.candidate_problems(engine)
    assert len(problems) == 1 and problems[0].startswith("A: candidate")


# --------------------------------------------------------------------------------------------------
# source_night_sums / source_sums
# --------------------------------------------------------------------------------------------------


def _sums_row(source_id: str, **values) -> dict:
    row = {
        "source_id": source_id,
        "ra_deg": 10.0,
        "dec_deg": 20.0,
        "nvss_flux_mjy": 100.0,
        "shift_mjy": 100.0,
        "flux_scale_error": 0.02,
        "n_obs": 2,
        "n_bad_err": 0,
        "sum_d": 1.0,
        "sum_d2": 2.0,
        "sum_w": 3.0,
        "sum_wd": 4.0,
        "sum_wd2": 5.0,
        "min_flux_mjy": 99.0,
        "max_flux_mjy": 102.0,
        "first_mjd": 61041.0,
        "last_mjd": 61042.0,
        "last_measured_at": 1.0e9,
    }
    row.update(values)
    return row


def test_add_source_sums_adds_and_widens(engine):
    with statistics_db.sums_transaction(engine) as conn:
        statistics_db.add_source_sums(
            conn, pd.DataFrame([_sums_row("B"), _sums_row("A", ra_deg=1.0)])
        )
    delta = _sums_row(
        "A",
        ra_deg=2.0,
        n_obs=3,
        sum_d=-0.5,
        sum_w=0.25,
        min_flux_mjy=98.0,
        max_flux_mjy=101.0,
        first_mjd=61043.0,
        last_mjd=61044.0,
        shift_mjy=7.0,
    )
    older = _sums_row(
        "B",
        ra_deg=5.0,
        n_obs=-1,
        sum_d=-1.0,
        min_flux_mjy=np.nan,
        max_flux_mjy=np.nan,
        first_mjd=np.nan,
        last_mjd=61000.0,
    )
    with statistics_db.sums_transaction(engine) as conn:
        assert statistics_db.add_source_sums(conn, pd.DataFrame([delta, older])) == 2
    got = statistics_db.source_sums(engine).set_index("source_id")
    a, b = got.loc["A"], got.loc["B"]
    assert (a["n_obs"], a["sum_d"], a["sum_w"], a["sum_d2"]) == (5, 0.5, 3.25, 4.0)
    assert (a["min_flux_mjy"], a["max_flux_mjy"]) == (98.0, 102.0)  # widened, never narrowed
    assert (a["first_mjd"], a["last_mjd"], a["ra_deg"]) == (61041.0, 61044.0, 2.0)  # newer epochs
    assert a["shift_mjy"] == 100.0  # a source's shift never changes
    assert (b["n_obs"], b["sum_d"], b["ra_deg"]) == (1, 0.0, 10.0)  # older epochs: catalog kept
    assert (b["min_flux_mjy"], b["last_mjd"]) == (99.0, 61042.0)  # missing extremes keep stored


def test_replace_night_sums_refresh_extremes_and_delete(engine):
    nights = pd.DataFrame(
        [
            {**_sums_row("A"), "night": "2026-01-01", "min_flux_mjy": 90.0, "last_mjd": 61041.5},
            {**_sums_row("A"), "night": "2026-01-02", "max_flux_mjy": 120.0},
            {**_sums_row("B"), "night": "2026-01-01"},
        ]
    )
    with statistics_db.sums_transaction(engine) as conn:
        assert (
            statistics_db.replace_night_sums(conn, nights, nights=["2026-01-01", "2026-01-02"]) == 3
        )
        statistics_db.put_source_sums(conn, pd.DataFrame([_sums_row("A"), _sums_row("B", n_obs=0)]))
        statistics_db.refresh_source_extremes(conn, ["A"])
        assert statistics_db.delete_source_sums(conn, ["A", "B"], only_empty=True) == 1
    a = statistics_db.source_sums(engine).set_index("source_id").loc["A"]
    assert (a["min_flux_mjy"], a["max_flux_mjy"], a["last_mjd"]) == (90.0, 120.0, 61042.0)
    assert statistics_db.source_sums(engine)["source_id"].tolist() == ["A"]
    # Replacing a night removes its rows of every source, then inserts the given ones.
    with statistics_db.sums_transaction(engine) as conn:
        statistics_db.replace_night_sums(conn, nights.iloc[[2]], nights=["2026-01-01"])
    got = statistics_db.night_sums(engine, nights=["2026-01-01", "2026-01-02"])
    assert list(zip(got["source_id"], got["night"], strict=True)) == [
        ("A", "2026-01-02"),
        ("B", "2026-01-01"),
    ]
    assert got["n_obs"].dtype == np.int64
    with statistics_db.sums_transaction(engine) as conn:
        statistics_db.replace_night_sums(conn, nights.iloc[:0], source_ids=["A"])
    assert statistics_db.night_sums(engine, source_ids=["A", "B"])["source_id"].tolist() == ["B"]
    with pytest.raises(ValueError, match="either"):
        statistics_db.night_sums(engine)


def test_night_photometry_window_and_counts(engine):
    _measure(engine, "/d/a.fits", ["S1", "S2"], NIGHTS[0], 61041.1)
    _measure(engine, "/d/b.fits", ["S1"], NIGHTS[1], 61042.1)
    _measure(engine, "/d/c.fits", ["S1", "S2"], NIGHTS[2], 61050.1)
    rows = photometry_db.night_photometry(engine, [NIGHTS[2], NIGHTS[0]])
    assert list(rows.columns) == list(photometry_db.NIGHT_PHOTOMETRY_COLUMNS)
    assert list(zip(rows["source_id"], rows["night"], strict=True)) == [
        ("S1", NIGHTS[0]),
        ("S1", NIGHTS[2]),
        ("S2", NIGHTS[0]),
        ("S2", NIGHTS[2]),
    ]
    assert len(photometry_db.source_photometry(engine, ["S1"])) == 3
    assert photometry_db.photometry_counts_by_source(engine, ["S1", "S2", "S9"]) == {
        "S1": 3,
        "S2": 2,
    }
    with statistics_db.sums_transaction(engine) as conn:
        statistics_db.put_source_sums(
            conn,
            pd.DataFrame([_sums_row("S1", last_mjd=61050.1), _sums_row("S2", last_mjd=61050.1)]),
        )
    window = photometry_db.window_photometry(engine, ["S1", "S2"], 8.5)  # mjd >= 61041.6
    assert list(zip(window["source_id"], window["mjd"], strict=True)) == [
        ("S1", 61042.1),
        ("S1", 61050.1),
        ("S2", 61050.1),
    ]
    assert len(photometry_db.window_photometry(engine, ["S1", "S2"], 100.0)) == 5

"""Tests for ese_assets.core.catalog: loaders, validation, footprint selection, cache."""

from __future__ import annotations

import os
import pickle
import sqlite3

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS

from ese_assets.core import catalog as catalog_module
from ese_assets.core.catalog import (
    Catalog,
    CatalogError,
    clear_catalog_cache,
    load_catalog,
    load_catalog_cached,
)
from ese_assets.core.source_ids import iau_source_id, iau_source_ids


def sin_wcs(ra_deg: float, dec_deg: float, shape: tuple[int, int], cell_deg: float) -> WCS:
    """Celestial SIN WCS with the reference pixel at the image centre."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]  # 1-based centre
    wcs.wcs.cdelt = [-cell_deg, cell_deg]
    wcs.pixel_shape = (nx, ny)
    return wcs


def brute_force_inside(catalog: Catalog, wcs: WCS, shape, margin=0.0, min_flux_mjy=0.0):
    """Reference answer: project every source and test the pixel rectangle."""
    ny, nx = shape
    x, y = wcs.world_to_pixel_values(catalog.ra_deg, catalog.dec_deg)
    inside = (x >= margin) & (x <= nx - 1 - margin) & (y >= margin) & (y <= ny - 1 - margin)
    if min_flux_mjy > 0:
        inside &= catalog.flux_mjy >= min_flux_mjy
    return np.flatnonzero(inside)


def random_catalog(rng, ra_deg, dec_deg, flux_mjy=None) -> Catalog:
    flux = rng.uniform(1.0, 100.0, len(ra_deg)) if flux_mjy is None else flux_mjy
    return Catalog(
        source_id=np.array([f"S{i}" for i in range(len(ra_deg))], dtype=object),
        ra_deg=np.mod(ra_deg, 360.0),
        dec_deg=dec_deg,
        flux_mjy=flux,
        path="test",
    )


# -- footprint selection --------------------------------------------------------------------------

SHAPE = (200, 200)
CELL_DEG = 0.0175  # 3.5 deg image, like DSA-110


def test_selection_across_ra_zero():
    rng = np.random.default_rng(11)
    ra = np.concatenate([rng.uniform(-4.0, 5.0, 400), [359.8, 0.2]])
    dec = np.concatenate([rng.uniform(-4.0, 4.0, 400), [0.1, -0.1]])
    catalog = random_catalog(rng, ra, dec)
    wcs = sin_wcs(0.5, 0.0, SHAPE, CELL_DEG)
    selected = catalog.select_in_footprint(wcs, SHAPE)
    np.testing.assert_array_equal(selected, brute_force_inside(catalog, wcs, SHAPE))
    assert {400, 401} <= set(selected.tolist())  # both sides of RA = 0 are inside
    # Sanity: the test catalog straddles the image edge, so the pixel test really cut something.
    assert 50 < len(selected) < 400


@pytest.mark.parametrize("dec_centre", [89.5, -89.5, 90.0])
def test_selection_at_the_pole(dec_centre):
    rng = np.random.default_rng(12)
    n = 600
    sign = np.sign(dec_centre)
    ra = rng.uniform(0.0, 360.0, n)  # sources at all right ascensions around the pole
    dec = sign * np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(85.0)), 1.0, n)))
    catalog = random_catalog(rng, ra, dec)
    wcs = sin_wcs(123.0, dec_centre, SHAPE, CELL_DEG)
    selected = catalog.select_in_footprint(wcs, SHAPE)
    expected = brute_force_inside(catalog, wcs, SHAPE)
    np.testing.assert_array_equal(selected, expected)
    assert len(expected) > 50  # ~95 expected: 600 sources in a 5-deg cap, 12 deg^2 image
    # The field crosses the pole, so selected sources span all right ascensions.
    assert np.ptp(catalog.ra_deg[selected]) > 300.0


def test_selection_all_sky_random_fields_match_brute_force():
    rng = np.random.default_rng(13)
    n = 3000
    catalog = random_catalog(
        rng, rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    )
    # A big cell makes each field cover many sources of a sparse all-sky catalog.
    shape, cell = (120, 160), 0.25
    for ra_c, dec_c in zip(rng.uniform(0, 360, 8), rng.uniform(-90, 90, 8), strict=True):
        wcs = sin_wcs(ra_c, dec_c, shape, cell)
        np.testing.assert_array_equal(
            catalog.select_in_footprint(wcs, shape), brute_force_inside(catalog, wcs, shape)
        )


def test_margin_and_min_flux():
    rng = np.random.default_rng(14)
    catalog = random_catalog(rng, rng.uniform(148.0, 152.0, 500), rng.uniform(28.0, 32.0, 500))
    wcs = sin_wcs(150.0, 30.0, SHAPE, CELL_DEG)
    selected = catalog.select_in_footprint(wcs, SHAPE, min_flux_mjy=50.0, edge_margin_pix=10.0)
    expected = brute_force_inside(catalog, wcs, SHAPE, margin=10.0, min_flux_mjy=50.0)
    np.testing.assert_array_equal(selected, expected)
    assert 0 < len(expected) < len(brute_force_inside(catalog, wcs, SHAPE))
    x, y = wcs.world_to_pixel_values(catalog.ra_deg[selected], catalog.dec_deg[selected])
    assert x.min() >= 10.0 and x.max() <= SHAPE[1] - 11.0 and y.min() >= 10.0


def test_pixel_boundary_is_inclusive():
    wcs = sin_wcs(150.0, 30.0, SHAPE, CELL_DEG)
    ny, nx = SHAPE
    # Just inside / just outside the first and last pixel centres (the world round trip is exact
    # only to ~1e-9 pix, hence the 1e-6 offsets).
    xs = np.array([1e-6, nx - 1.0 - 1e-6, -0.01, nx - 0.99, 50.0])
    ys = np.array([1e-6, ny - 1.0 - 1e-6, 5.0, 5.0, ny - 0.99])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    catalog = Catalog(
        source_id=np.array(list("abcde"), dtype=object),
        ra_deg=ra,
        dec_deg=dec,
        flux_mjy=np.ones(5),
        path="edge",
    )
    assert catalog.select_in_footprint(wcs, SHAPE).tolist() == [0, 1]


def test_nan_flux_only_selected_without_flux_cut():
    wcs = sin_wcs(10.0, 10.0, SHAPE, CELL_DEG)
    catalog = Catalog(
        source_id=np.array(["a", "b"], dtype=object),
        ra_deg=[10.0, 10.1],
        dec_deg=[10.0, 10.1],
        flux_mjy=[np.nan, 20.0],
        path="nan",
    )
    assert catalog.select_in_footprint(wcs, SHAPE).tolist() == [0, 1]
    assert catalog.select_in_footprint(wcs, SHAPE, min_flux_mjy=10.0).tolist() == [1]


def test_index_built_once_and_arrays_read_only(monkeypatch):
    rng = np.random.default_rng(15)
    catalog = random_catalog(rng, rng.uniform(0, 10, 100), rng.uniform(0, 10, 100))
    calls = []
    original = catalog_module._SkyIndex.build
    monkeypatch.setattr(
        catalog_module._SkyIndex,
        "build",
        classmethod(lambda cls, ra, dec: calls.append(1) or original(ra, dec)),
    )
    wcs = sin_wcs(5.0, 5.0, SHAPE, CELL_DEG)
    first = catalog.select_in_footprint(wcs, SHAPE)
    second = catalog.select_in_footprint(sin_wcs(6.0, 4.0, SHAPE, CELL_DEG), SHAPE)
    assert len(calls) == 1
    assert len(first) > 0 and len(second) > 0
    with pytest.raises(ValueError):
        catalog.ra_deg[0] = 1.0


def test_catalog_pickles_without_its_index():
    rng = np.random.default_rng(17)
    catalog = random_catalog(rng, rng.uniform(0, 10, 50), rng.uniform(0, 10, 50))
    wcs = sin_wcs(5.0, 5.0, SHAPE, CELL_DEG)
    selected = catalog.select_in_footprint(wcs, SHAPE)
    copy = pickle.loads(pickle.dumps(catalog))
    assert copy._index_cache is None
    np.testing.assert_array_equal(copy.ra_deg, catalog.ra_deg)
    assert list(copy.source_id) == list(catalog.source_id) and copy.path == catalog.path
    np.testing.assert_array_equal(copy.select_in_footprint(wcs, SHAPE), selected)


def test_catalog_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        Catalog(
            source_id=np.array(["a"], dtype=object),
            ra_deg=[1.0, 2.0],
            dec_deg=[0.0, 0.0],
            flux_mjy=[1.0, 1.0],
        )


# -- loaders --------------------------------------------------------------------------------------


def test_csv_with_aliases_and_generated_ids(tmp_path):
    path = tmp_path / "nvss.csv"
    path.write_text("RAJ2000,DEJ2000,S1.4\n120.0,45.0,12.5\n-15.0,-0.0001,3.0\n")
    catalog = load_catalog(path)
    assert len(catalog) == 2
    assert list(catalog.source_id) == ["J080000+450000", "J230000-000000"]
    np.testing.assert_allclose(catalog.ra_deg, [120.0, 345.0])  # negative RA wrapped
    np.testing.assert_allclose(catalog.flux_mjy, [12.5, 3.0])
    assert catalog.path == str(path)


def test_csv_names_kept_and_empty_names_filled(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("Name,ra_deg,dec_deg,flux_mjy\n0042,10.0,20.0,5\n,120.0,45.0,7\n")
    catalog = load_catalog(path)
    assert list(catalog.source_id) == ["0042", "J080000+450000"]


def test_whitespace_text_file(tmp_path):
    path = tmp_path / "cat.txt"
    path.write_text("name  ra  dec  flux_jy\nsrcA  1.0  2.0  0.5\nsrcB  3.0  -4.0  0.025\n")
    catalog = load_catalog(path)
    assert list(catalog.source_id) == ["srcA", "srcB"]
    np.testing.assert_allclose(catalog.flux_mjy, [500.0, 25.0])  # *_jy converted to mJy


def test_missing_flux_column_gives_nan(tmp_path):
    path = tmp_path / "noflux.csv"
    path.write_text("ra,dec\n1,2\n")
    assert np.isnan(load_catalog(path).flux_mjy).all()


def test_fits_table_with_jy_column(tmp_path):
    path = tmp_path / "cat.fits"
    table = Table(
        {
            "SOURCE_ID": ["a", "b"],
            "RA_DEG": [10.0, 20.0],
            "DEC_DEG": [-5.0, 5.0],
            "FLUX_JY": [0.1, 0.2],
        }
    )
    table.write(path)
    catalog = load_catalog(path)
    assert list(catalog.source_id) == ["a", "b"]
    np.testing.assert_allclose(catalog.flux_mjy, [100.0, 200.0])


def test_fits_table_unit_overrides_name(tmp_path):
    # A column called "flux" but carrying unit Jy is converted by its unit.
    path = tmp_path / "unit.fits"
    Table({"ra": [1.0], "dec": [2.0], "flux": [0.3] * u.Jy}).write(path)
    np.testing.assert_allclose(load_catalog(path).flux_mjy, [300.0])


def test_votable(tmp_path):
    # peak_flux with a declared unit: the unit wins over the PyBDSF/Aegean convention (Jy/beam).
    path = tmp_path / "cat.vot"
    Table(
        {
            "name": ["x", "y", "z"],
            "ra": [1.0, 2.0, 3.0],
            "dec": [0.0, 1.0, 2.0],
            "peak_flux": [1.0, 2.0, 3.0] * u.mJy / u.beam,
        }
    ).write(path, format="votable")
    catalog = load_catalog(path)
    assert list(catalog.source_id) == ["x", "y", "z"]
    np.testing.assert_allclose(catalog.flux_mjy, [1.0, 2.0, 3.0])


def make_sqlite(path, rows, table="sources"):
    with sqlite3.connect(path) as connection:
        connection.execute(
            f"CREATE TABLE {table} (source_id TEXT, ra_deg REAL, dec_deg REAL, nvss_flux_mjy REAL)"
        )
        connection.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", rows)
    connection.close()


def test_sqlite_sources_table(tmp_path):
    path = tmp_path / "master_sources.sqlite3"
    make_sqlite(path, [("NVSS1", 10.0, 20.0, 15.0), (None, 120.0, 45.0, None)])
    catalog = load_catalog(path)
    assert list(catalog.source_id) == ["NVSS1", "J080000+450000"]
    assert catalog.flux_mjy[0] == 15.0 and np.isnan(catalog.flux_mjy[1])


def test_sqlite_without_sources_table(tmp_path):
    path = tmp_path / "other.db"
    make_sqlite(path, [("a", 1.0, 2.0, 3.0)], table="objects")
    with pytest.raises(CatalogError, match="no 'sources' table"):
        load_catalog(path)


def test_sqlite_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "fake.db"
    path.write_text("not sqlite" * 100)
    with pytest.raises(CatalogError, match=r"fake\.db"):
        load_catalog(path)


# -- validation errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("name,dec,flux\na,1,2\n", "missing RA column"),
        ("name,ra,flux\na,1,2\n", "missing Dec column"),
        ("name,ra,dec\na,1,abc\nb,2,3\n", "column 'dec' row 1: 'abc' is not a number"),
        ("name,ra,dec\na,1,\n", "column 'dec' row 1: empty"),
        ("name,ra,dec,flux\na,1,2,bright\n", "column 'flux' row 1: 'bright' is not a number"),
        ("name,ra,dec\na,1,2\na,3,4\n", "duplicate source_id"),
        ("ra,dec\n10.0,20.0\n10.00001,20.00001\n", "duplicate source_id"),  # same generated name
        ("name,ra,dec\na,1,90.5\n", "column 'dec' row 1: 90.5 is outside [-90, 90]"),
        ("name,ra,dec\na,361,0\n", "column 'ra' row 1: 361 is outside [0, 360)"),
        ("name,ra,dec\na,-400,0\n", "column 'ra' row 1: -400 is outside [0, 360)"),
        ("name,ra,dec\n", "catalog is empty"),
        ("", "catalog is empty"),
    ],
)
def test_csv_errors_name_file_and_problem(tmp_path, content, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="unknown catalog format"):
        (tmp_path / "cat.parquet").write_bytes(b"x")
        load_catalog(tmp_path / "cat.parquet")
    with pytest.raises(CatalogError, match="file not found"):
        load_catalog(tmp_path / "absent.csv")


# -- cache ----------------------------------------------------------------------------------------


def test_load_catalog_cached_reloads_when_file_changes(tmp_path):
    clear_catalog_cache()
    path = tmp_path / "cache.csv"
    path.write_text("ra,dec,flux\n1,2,3\n")
    first = load_catalog_cached(path)
    assert load_catalog_cached(str(path)) is first
    path.write_text("ra,dec,flux\n1,2,3\n4,5,6\n")
    os.utime(path, ns=(1, 1))  # a different mtime, independent of the clock resolution
    second = load_catalog_cached(path)
    assert second is not first and len(second) == 2
    assert load_catalog_cached(path) is second


def test_generated_ids_agree_with_scalar_function(tmp_path):
    rng = np.random.default_rng(16)
    ra, dec = rng.uniform(0, 360, 50), rng.uniform(-90, 90, 50)
    path = tmp_path / "gen.csv"
    path.write_text(
        "ra,dec\n" + "".join(f"{float(r)!r},{float(d)!r}\n" for r, d in zip(ra, dec, strict=True))
    )
    catalog = load_catalog(path)
    assert list(catalog.source_id) == [iau_source_id(r, d) for r, d in zip(ra, dec, strict=True)]
    assert list(catalog.source_id) == list(iau_source_ids(ra, dec))

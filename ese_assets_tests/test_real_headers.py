"""Real-world header conventions measured end to end, against the fluxes injected.

Each case writes a FITS image in the convention of a real writer (Galactic and FK4 B1950 WCS,
DEC-first axes, mJy/beam and uJy/beam, AIPS HISTORY beam, CASA 4-D cube with a BEAMS table,
arcsec or degree beams of any size; see :mod:`ese_assets_tests.header_conventions`), with point
sources at known ICRS positions, and measures it through the real code: ``load_image`` ->
``Catalog.select_in_footprint`` -> ``forced_photometry`` (or ``measure_image`` into an SQLite
products database after registration). Checks: the sources selected are exactly those injected
inside the image, at the injected pixel positions; fluxes agree with the injected ones within
their errors; the stored centre is the ICRS centre. Sources are 20-200 sigma, so a position off by
more than a beam, a wrong unit or a wrong beam size fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from astropy.coordinates import SkyCoord
from astropy.io import fits

from ese_assets.core import frames
from ese_assets.core.fits_header import jyb_per_unit
from ese_assets.core.fits_image import Beam, ImageError, load_image, read_image_info
from ese_assets.core.photometry import forced_photometry
from ese_assets.pipeline import measurement, registration
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets_tests.header_conventions import ARCSEC, ImageSpec, native_frame, write_field

#: Largest |(F - F_true) / sigma_F| accepted for any source (a 5-sigma event in ~50 sources has
#: probability ~3e-5); the mean pull must be within 0.6 (~4 standard errors for ~50 sources).
MAX_PULL = 5.0
MAX_MEAN_PULL = 0.6


def _separation_arcsec(ra1, dec1, ra2, dec2) -> float:
    return float(frames.angular_distance_deg(ra1, dec1, ra2, dec2)) * 3600.0


def _measure_direct(field):
    """load_image -> select_in_footprint -> forced_photometry in the image's frame."""
    image = load_image(field.path)
    info = image.info
    idx = field.catalog.select_in_footprint(info.wcs, info.shape)
    lon, lat = frames.icrs_to_frame(info.wcs, field.catalog.ra_deg[idx], field.catalog.dec_deg[idx])
    # The selection's own positions (what measure_image uses) are the same, from one transform.
    idx_sel, lon_sel, lat_sel = field.catalog.footprint_positions(info.wcs, info.shape)
    np.testing.assert_array_equal(idx_sel, idx)
    np.testing.assert_array_equal(lon_sel, lon)
    np.testing.assert_array_equal(lat_sel, lat)
    return image, idx, forced_photometry(image.data, info.wcs, info.beam, lon, lat)


def _check_fluxes(measured_jy, err_jy, true_jy) -> None:
    assert np.isfinite(measured_jy).all() and (err_jy > 0).all()
    pulls = (measured_jy - true_jy) / err_jy
    assert np.abs(pulls).max() < MAX_PULL, pulls
    assert abs(pulls.mean()) < MAX_MEAN_PULL, pulls.mean()
    assert np.median(measured_jy / true_jy) == pytest.approx(1.0, abs=0.01)


def check_direct(field, beam: Beam | None = None) -> None:
    info = read_image_info(field.path)
    if beam is not None:  # header facts first: a wrong beam would make the photometry crawl
        assert info.beam.major_deg == pytest.approx(beam.major_deg, rel=1e-5)
        assert info.beam.minor_deg == pytest.approx(beam.minor_deg, rel=1e-5)
        assert info.beam.pa_deg == pytest.approx(beam.pa_deg, abs=1e-4)
    image, idx, phot = _measure_direct(field)
    assert image.info.beam == info.beam and image.info.shape == info.shape  # readers agree
    assert (image.info.center_ra_deg, image.info.center_dec_deg) == (
        info.center_ra_deg,
        info.center_dec_deg,
    )
    np.testing.assert_array_equal(idx, np.flatnonzero(field.inside))
    assert idx.size >= 20
    # The sources land on the pixels where they were injected (x along longitude).
    np.testing.assert_allclose(phot.x_pix, field.x_lon_pix[idx], atol=0.02)
    np.testing.assert_allclose(phot.y_pix, field.y_lat_pix[idx], atol=0.02)
    assert (phot.quality_flag == 0).all()
    _check_fluxes(phot.peak_jyb, phot.peak_err_jyb, field.flux_jy[idx])
    assert _separation_arcsec(info.center_ra_deg, info.center_dec_deg, *field.center_icrs_deg) < 1.0


def _engine(tmp_path):
    engine = make_engine(tmp_path / "products.sqlite3")
    ensure_schema(engine)
    return engine


def _register(engine, path: str):
    return registration.inspect_files(engine, [path], timezone="UTC", first_night="2020-01-01")


def _image_row(engine, path: str) -> dict:
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.text(
                    "SELECT status, reason, ra_center_deg, dec_center_deg, n_sources, beam_maj_deg "
                    "FROM images WHERE path = :path"
                ),
                {"path": path},
            )
            .mappings()
            .one()
        )
    return dict(row)


def check_pipeline(tmp_path, field) -> pd.DataFrame:
    """Register and measure the image into SQLite; check the stored rows against the truth."""
    engine = _engine(tmp_path)
    path = str(Path(field.path).resolve())
    scan = _register(engine, path)
    assert scan.registered == [path], scan.rejected
    result = measurement.measure_image(engine, field.catalog, path)
    assert result.status == "measured", result.reason
    row = _image_row(engine, path)
    assert row["status"] == "measured"
    assert (
        _separation_arcsec(row["ra_center_deg"], row["dec_center_deg"], *field.center_icrs_deg)
        < 1.0
    )
    with engine.connect() as conn:
        stored = pd.read_sql(
            sa.text(
                "SELECT source_id, ra_deg, dec_deg, peak_jyb, peak_err_jyb, "
                "quality_flag FROM photometry WHERE image_path = :path "
                "ORDER BY source_id"
            ),
            conn,
            params={"path": path},
        )
    expected = np.flatnonzero(field.inside)
    assert list(stored["source_id"]) == list(field.catalog.source_id[expected])
    assert row["n_sources"] == expected.size
    np.testing.assert_allclose(stored["ra_deg"], field.catalog.ra_deg[expected])  # ICRS kept
    assert (stored["quality_flag"] == 0).all()
    _check_fluxes(
        stored["peak_jyb"].to_numpy(), stored["peak_err_jyb"].to_numpy(), field.flux_jy[expected]
    )
    engine.dispose()
    return stored


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


def test_galactic_wcs_measured_through_pipeline(tmp_path):
    spec = ImageSpec(frame="galactic", center_icrs=(266.0, -29.0))  # near the Galactic centre
    field = write_field(tmp_path / "galactic.fits", spec, seed=11)
    info = read_image_info(field.path)
    assert info.frame == "galactic" and list(info.wcs.wcs.ctype) == ["GLON-SIN", "GLAT-SIN"]
    # The stored centre is ICRS RA/Dec, not (l, b).
    gal = SkyCoord(*field.center_icrs_deg, unit="deg").galactic
    assert (
        _separation_arcsec(info.center_ra_deg, info.center_dec_deg, gal.l.deg, gal.b.deg) > 3600.0
    )
    check_direct(field, spec.beam)
    check_pipeline(tmp_path, field)


def test_fk4_b1950_measured_through_pipeline(tmp_path):
    spec = ImageSpec(frame="fk4", center_icrs=(150.0, 30.0))
    field = write_field(tmp_path / "b1950.fits", spec, seed=12)
    # The test means something: read as ICRS, the B1950 coordinates are ~30' from the truth.
    b1950 = SkyCoord(*field.center_icrs_deg, unit="deg").transform_to(native_frame("fk4"))
    assert _separation_arcsec(b1950.ra.deg, b1950.dec.deg, *field.center_icrs_deg) > 1200.0
    info = read_image_info(field.path)
    assert info.frame.startswith("fk4 B1950")
    check_direct(field, spec.beam)
    check_pipeline(tmp_path, field)


def test_fk5_j2000_and_default_frames(tmp_path):
    for i, frame in enumerate(("fk5", "fk5-aips", "icrs")):
        field = write_field(tmp_path / f"{frame}.fits", ImageSpec(frame=frame), seed=20 + i)
        assert read_image_info(field.path).frame.split()[0] == frame.split("-")[0]
        check_direct(field)


@pytest.mark.parametrize(
    "frame, axis_order", [("icrs", "lat-lon"), ("galactic", "lat-lon"), ("fk5", "freq-lon-lat")]
)
def test_celestial_axes_in_any_order(tmp_path, frame, axis_order):
    spec = ImageSpec(frame=frame, axis_order=axis_order, shape=(130, 170))
    field = write_field(tmp_path / "axes.fits", spec, seed=13)
    with fits.open(field.path) as hdul:
        first = hdul[0].header["CTYPE1"]
    assert first[:3] in ("DEC", "GLA", "FRE")
    info = read_image_info(field.path)
    assert info.shape == (130, 170)  # (latitude, longitude) whatever the file order
    assert info.freq_hz == (pytest.approx(1.4e9) if axis_order == "freq-lon-lat" else None)
    assert info.wcs.wcs.lng == 0 and info.wcs.wcs.lat == 1
    check_direct(field, spec.beam)


def test_dec_first_axes_measured_through_pipeline(tmp_path):
    field = write_field(tmp_path / "decfirst.fits", ImageSpec(axis_order="lat-lon"), seed=14)
    check_pipeline(tmp_path, field)


def test_unsupported_frame_rejected(tmp_path):
    field = write_field(tmp_path / "ecl.fits", ImageSpec(), seed=15)
    with fits.open(field.path, mode="update") as hdul:
        hdul[0].header["CTYPE1"], hdul[0].header["CTYPE2"] = "ELON-SIN", "ELAT-SIN"
    with pytest.raises(ImageError, match=r"unsupported celestial frame \(ELON/ELAT"):
        read_image_info(field.path)


# --------------------------------------------------------------------------------------------------
# Brightness unit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bunit, scale",
    [
        ("mJy/beam", 1e3),
        ("uJy/beam", 1e6),
        ("JY/BEAM", 1.0),
        ("microJy/beam", 1e6),
        ("Jy beam-1", 1.0),
        (None, 1.0),
    ],
)
def test_bunit_scaled_to_jy_per_beam(tmp_path, bunit, scale):
    spec = ImageSpec(bunit=bunit, unit_scale=scale)
    field = write_field(tmp_path / "unit.fits", spec, seed=16)
    assert read_image_info(field.path).jyb_per_unit == pytest.approx(1.0 / scale)
    check_direct(field)


def test_mjy_per_beam_stored_in_jy_per_beam(tmp_path):
    spec = ImageSpec(bunit="mJy/beam", unit_scale=1e3)
    check_pipeline(tmp_path, write_field(tmp_path / "mjy.fits", spec, seed=17))


@pytest.mark.parametrize("bunit", ["K", "Jy/pixel", "MJy/sr", "MJY/BEAM", "counts"])
def test_unsupported_bunit_rejected_naming_it(tmp_path, bunit):
    field = write_field(tmp_path / "bad_unit.fits", ImageSpec(bunit=bunit), seed=18)
    for reader in (read_image_info, load_image):  # the sensor's header-only reader too
        with pytest.raises(ImageError) as err:
            reader(field.path)
        assert f"unsupported BUNIT '{bunit}'" in err.value.reason


def test_bunit_spellings():
    cases = {
        "Jy/beam": 1.0,
        "JY/BEAM": 1.0,
        "Jy/Beam": 1.0,
        "jy/beam": 1.0,
        "mJy/beam": 1e-3,
        "mJy/Beam": 1e-3,
        "MILLIJY/BEAM": 1e-3,
        "uJy/beam": 1e-6,
        "UJY/BEAM": 1e-6,
        "microJy/beam": 1e-6,
        "Jy beam-1": 1.0,
        "beam-1 Jy": 1.0,
        "mJy beam^-1": 1e-3,
        "Jy.beam-1": 1.0,
        "": 1.0,
    }
    for text, factor in cases.items():
        header = fits.Header()
        header["BUNIT"] = text
        assert jyb_per_unit("x.fits", header) == pytest.approx(factor), text
    assert jyb_per_unit("x.fits", fits.Header()) == 1.0  # missing BUNIT: Jy/beam


# --------------------------------------------------------------------------------------------------
# Beams
# --------------------------------------------------------------------------------------------------


def test_aips_history_beam_measured_through_pipeline(tmp_path):
    # AIPS: EQUINOX without RADESYS, upper-case BUNIT, DATE-OBS without a time, beam only in
    # HISTORY (after another task's arcsec beam that must not be taken).
    spec = ImageSpec(
        frame="fk5-aips",
        bunit="JY/BEAM",
        beam_style="aips",
        beam=Beam(25.0 * ARCSEC, 18.0 * ARCSEC, -15.06),
        extra={"DATE-OBS": "2024-03-01", "ORIGIN": "AIPS"},
    )
    field = write_field(tmp_path / "aips.fits", spec, seed=19)
    header = fits.getheader(field.path)
    assert "BMAJ" not in header and "AIPS   CLEAN BMAJ=" in str(header["HISTORY"])
    check_direct(field, spec.beam)
    check_pipeline(tmp_path, field)


def test_casa_cube_with_beams_table_measured_through_pipeline(tmp_path):
    spec = ImageSpec(cube=True, beam_style="casa", beam=Beam(28.0 * ARCSEC, 21.0 * ARCSEC, 60.0))
    field = write_field(tmp_path / "casa.fits", spec, seed=21)
    with fits.open(field.path) as hdul:
        assert hdul[0].data.shape == (1, 1, *spec.shape) and "BMAJ" not in hdul[0].header
        assert hdul["BEAMS"].columns["BMAJ"].unit == "arcsec"
    check_direct(field, spec.beam)
    check_pipeline(tmp_path, field)


def test_casa_beams_table_read_without_image_data(tmp_path):
    # Garbage in the image data section: the header-only reader still finds the BEAMS table.
    spec = ImageSpec(cube=True, beam_style="casa", beam=Beam(28.0 * ARCSEC, 21.0 * ARCSEC, 60.0))
    field = write_field(tmp_path / "casa.fits", spec, seed=22)
    with fits.open(field.path) as hdul:
        start = hdul[0].fileinfo()["datLoc"]
        size = hdul[0].size  # bytes of the data section
    raw = bytearray(Path(field.path).read_bytes())
    raw[start : start + size] = b"\xff" * size
    Path(field.path).write_bytes(bytes(raw))
    beam = read_image_info(field.path).beam
    assert beam.major_deg == pytest.approx(28.0 * ARCSEC, rel=1e-6)
    assert beam.pa_deg == pytest.approx(60.0)


def test_casa_beams_table_with_several_planes(tmp_path):
    field = write_field(tmp_path / "casa.fits", ImageSpec(cube=True, beam_style="casa"), seed=23)
    with fits.open(field.path) as hdul:
        primary = hdul[0].copy()
    columns = [
        fits.Column(name="BMAJ", format="1E", unit="arcsec", array=[30.0, 40.0, 50.0]),
        fits.Column(name="BMIN", format="1E", unit="arcsec", array=[20.0, 30.0, 40.0]),
        fits.Column(name="BPA", format="1E", unit="deg", array=[35.0, 0.0, 0.0]),
        fits.Column(name="CHAN", format="1J", array=[0, 1, 0]),
        fits.Column(name="POL", format="1J", array=[0, 0, 1]),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="BEAMS")
    fits.HDUList([primary, table]).writeto(field.path, overwrite=True)
    beam = read_image_info(field.path).beam  # channel 0, polarisation 0
    assert (beam.major_deg * 3600, beam.minor_deg * 3600, beam.pa_deg) == pytest.approx(
        (30.0, 20.0, 35.0)
    )
    table.data["CHAN"][0] = 2  # no row for the image's plane any more
    fits.HDUList([primary, table]).writeto(field.path, overwrite=True)
    with pytest.raises(ImageError, match="CASA BEAMS table has 3 rows and 0 for channel 0"):
        read_image_info(field.path)


def test_casambm_without_table_names_it(tmp_path):
    field = write_field(tmp_path / "casa.fits", ImageSpec(beam_style="casa"), seed=24)
    with fits.open(field.path) as hdul:
        primary = hdul[0].copy()
    primary.writeto(field.path, overwrite=True)
    with pytest.raises(ImageError, match="missing beam keyword BMAJ and no CASA BEAMS table"):
        read_image_info(field.path)


@pytest.mark.parametrize(
    "beam_arcsec, cell_arcsec, style",
    [
        ((0.8, 0.6, 20.0), 0.2, "arcsec"),  # sub-arcsec beam written in arcsec (VLA A, MeerKAT L)
        ((10.0, 8.0, -40.0), 2.0, "deg"),  # a 10" beam in degrees (0.0028 deg)
        ((45.0, 45.0, 0.0), 9.0, "arcsec"),  # NVSS-like beam in arcsec
        ((900.0, 900.0, 0.0), 180.0, "deg"),  # a 15' single-dish beam in degrees
    ],
)
def test_beam_unit_decided_against_pixel_scale(tmp_path, beam_arcsec, cell_arcsec, style):
    major, minor, pa = beam_arcsec
    beam = Beam(major * ARCSEC, minor * ARCSEC, pa)
    spec = ImageSpec(
        beam=beam, beam_style=style, cell_deg=cell_arcsec * ARCSEC, center_icrs=(210.0, 54.0)
    )
    field = write_field(tmp_path / "beam.fits", spec, seed=25)
    check_direct(field, beam)


# --------------------------------------------------------------------------------------------------
# Time and data sanity
# --------------------------------------------------------------------------------------------------


def test_conflicting_date_obs_and_mjd_obs_rejected_with_both_values(tmp_path):
    spec = ImageSpec(extra={"MJD-OBS": 60370.25})  # DATE-OBS says 2024-03-01T04:05:06
    field = write_field(tmp_path / "times.fits", spec, seed=26)
    expected = "DATE-OBS '2024-03-01T04:05:06.000' and MJD-OBS 60370.25 disagree"
    for reader in (read_image_info, load_image):
        with pytest.raises(ImageError, match=expected):
            reader(field.path)
    engine = _engine(tmp_path)
    path = str(Path(field.path).resolve())
    scan = _register(engine, path)
    assert scan.registered == [] and expected in scan.rejected[0][1]
    assert _image_row(engine, path)["status"] == "rejected"
    engine.dispose()


def test_date_only_and_old_style_date_obs_accepted_with_mjd_obs(tmp_path):
    # AIPS writes the day only; pre-2000 files use DD/MM/YY. MJD-OBS gives the time of day.
    for date_obs, mjd in (("1998-01-22", 50835.4), ("22/01/98", 50835.4)):
        field = write_field(
            tmp_path / "old.fits", ImageSpec(extra={"DATE-OBS": date_obs, "MJD-OBS": mjd}), seed=29
        )
        assert read_image_info(field.path).mjd == pytest.approx(mjd, abs=1e-9)
    field = write_field(
        tmp_path / "old.fits",
        ImageSpec(extra={"DATE-OBS": "23/01/98", "MJD-OBS": 50835.4}),
        seed=29,
    )
    with pytest.raises(ImageError, match=r"DATE-OBS '23/01/98' and MJD-OBS 50835\.4 disagree"):
        read_image_info(field.path)


@pytest.mark.parametrize("value, shown", [(0.0, "0"), (0.005, "0.005")])
def test_constant_image_rejected_with_reason(tmp_path, value, shown):
    field = write_field(tmp_path / "flat.fits", ImageSpec(), seed=27)
    with fits.open(field.path, mode="update") as hdul:
        hdul[0].data[:] = value
        hdul[0].data[:3] = np.nan  # blanks do not make it less constant
    reason = f"image is constant (all pixels = {shown})"
    with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_image(field.path)
    engine = _engine(tmp_path)
    path = str(Path(field.path).resolve())
    assert _register(engine, path).registered == [path]  # the header is fine
    result = measurement.measure_image(engine, field.catalog, path)
    assert (result.status, result.reason) == ("rejected", reason)
    row = _image_row(engine, path)
    assert (row["status"], row["reason"]) == ("rejected", reason)
    engine.dispose()


# --------------------------------------------------------------------------------------------------
# Frames module
# --------------------------------------------------------------------------------------------------


def test_icrs_to_frame_round_trip_matches_astropy(tmp_path):
    rng = np.random.default_rng(3)
    ra, dec = rng.uniform(0, 360, 500), rng.uniform(-89, 89, 500)
    for frame in ("fk4", "galactic"):
        field = write_field(tmp_path / f"{frame}.fits", ImageSpec(frame=frame), seed=28)
        wcs = read_image_info(field.path).wcs
        lon, lat = frames.icrs_to_frame(wcs, ra, dec)
        truth = SkyCoord(ra, dec, unit="deg").transform_to(native_frame(frame))
        assert (
            np.abs(
                frames.angular_distance_deg(
                    lon, lat, truth.spherical.lon.deg, truth.spherical.lat.deg
                )
            ).max()
            < 1e-9
        )
        back_ra, back_dec = frames.frame_to_icrs(wcs, lon, lat)
        assert frames.angular_distance_deg(back_ra, back_dec, ra, dec).max() * 3600 < 1e-6

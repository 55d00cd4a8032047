"""Tests for ese_assets.core.fits_image: real FITS files with SIN WCS written into tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from ese_assets.core.fits_image import (
    Beam,
    FitsImage,
    ImageError,
    ImageInfo,
    angular_distance_deg,
    load_image,
    read_image_info,
)

NY, NX = 64, 80
CELL_DEG = 0.01


def make_header(
    *, ra_deg=150.0, dec_deg=30.0, ny=NY, nx=NX, cube=False, nfreq=1, drop=(), **extra
) -> fits.Header:
    """Primary header of a SIN-projected image (2-D, or 4-D CASA order x, y, FREQ, STOKES)."""
    header = fits.Header()
    header["CTYPE1"], header["CRVAL1"], header["CDELT1"] = "RA---SIN", ra_deg, -CELL_DEG
    header["CRPIX1"], header["CUNIT1"] = nx / 2 + 1, "deg"
    header["CTYPE2"], header["CRVAL2"], header["CDELT2"] = "DEC--SIN", dec_deg, CELL_DEG
    header["CRPIX2"], header["CUNIT2"] = ny / 2 + 1, "deg"
    if cube:
        header["CTYPE3"], header["CRVAL3"], header["CDELT3"] = "FREQ", 1400.0, 1.0
        header["CRPIX3"], header["CUNIT3"] = 1.0, "MHz"
        header["CTYPE4"], header["CRVAL4"], header["CDELT4"], header["CRPIX4"] = "STOKES", 1, 1, 1
    header["BUNIT"] = "JY/BEAM"
    header["BMAJ"], header["BMIN"], header["BPA"] = 0.01, 0.008, 30.0
    header["DATE-OBS"] = "2024-03-01T12:00:00.000"
    header["MJD-OBS"] = 60370.5
    header["RESTFRQ"] = 1.4e9
    header.update(extra)
    for key in drop:
        del header[key]
    return header


def write_image(path, data=None, **kwargs) -> str:
    """Write a FITS image with :func:`make_header`; data shape follows the header (numpy order)."""
    cube, nfreq = kwargs.get("cube", False), kwargs.get("nfreq", 1)
    ny, nx = kwargs.get("ny", NY), kwargs.get("nx", NX)
    if data is None:
        data = np.random.default_rng(1).normal(0.0, 1e-3, (ny, nx)).astype(np.float32)
    if cube:
        data = np.repeat(data[np.newaxis, np.newaxis], nfreq, axis=1)  # (STOKES, FREQ, y, x)
    fits.PrimaryHDU(data=data, header=make_header(**kwargs)).writeto(path, overwrite=True)
    return str(path)


def assert_image_error(path, fragment, reader=read_image_info):
    with pytest.raises(ImageError) as info:
        reader(path)
    err = info.value
    assert fragment in err.reason
    assert err.path == str(path)
    assert str(err) == f"{path}: {err.reason}"
    return err


# -- good files -----------------------------------------------------------------------------------


def test_good_2d_image(tmp_path):
    data = np.arange(NY * NX, dtype=np.float32).reshape(NY, NX)
    path = write_image(tmp_path / "good.fits", data)
    info = read_image_info(path)
    assert isinstance(info, ImageInfo)
    assert info.shape == (NY, NX)
    assert info.wcs.naxis == 2 and info.wcs.pixel_shape == (NX, NY)
    assert info.beam == Beam(major_deg=0.01, minor_deg=0.008, pa_deg=30.0)
    assert info.mjd == pytest.approx(60370.5, abs=1e-9)
    assert info.date_obs.startswith("2024-03-01T12:00:00")
    assert info.freq_hz == pytest.approx(1.4e9)
    assert info.file_size == (tmp_path / "good.fits").stat().st_size

    image = load_image(path)
    assert isinstance(image, FitsImage)
    assert image.data.shape == (NY, NX)
    assert image.data.dtype.isnative
    np.testing.assert_array_equal(image.data, data)


def test_center_and_radius_match_wcs(tmp_path):
    info = read_image_info(write_image(tmp_path / "good.fits"))
    ra, dec = info.wcs.pixel_to_world_values((NX - 1) / 2, (NY - 1) / 2)
    assert info.center_ra_deg == pytest.approx(float(ra))
    assert info.center_dec_deg == pytest.approx(float(dec))
    # Half-diagonal of the pixel-edge rectangle; the SIN projection is nearly flat at this size.
    half_diagonal_deg = CELL_DEG * np.hypot(NX, NY) / 2
    assert info.radius_deg == pytest.approx(half_diagonal_deg, rel=1e-3)
    # Every pixel centre lies inside the circle.
    yy, xx = np.mgrid[0:NY, 0:NX]
    ra_all, dec_all = info.wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    dist = angular_distance_deg(info.center_ra_deg, info.center_dec_deg, ra_all, dec_all)
    assert dist.max() <= info.radius_deg


def test_center_wraps_ra_into_0_360(tmp_path):
    # The central pixel (0-based (nx-1)/2) is half a pixel east of CRPIX: RA = CRVAL1 + 0.5 cell
    # / cos(dec), which crosses 360 deg here and must come back wrapped into [0, 360).
    for crval_deg in (359.999, -0.001):
        info = read_image_info(write_image(tmp_path / "wrap.fits", ra_deg=crval_deg, dec_deg=-10.0))
        expected = (crval_deg + 0.5 * CELL_DEG / np.cos(np.radians(10.0))) % 360.0
        assert 0.0 <= info.center_ra_deg < 360.0
        assert info.center_ra_deg == pytest.approx(expected, abs=1e-6)


def test_4d_casa_cube_with_degenerate_axes(tmp_path):
    data = np.random.default_rng(3).normal(size=(NY, NX)).astype(np.float32)
    path = write_image(tmp_path / "cube.fits", data, cube=True)
    with fits.open(path) as hdul:
        assert hdul[0].data.shape == (1, 1, NY, NX)  # STOKES, FREQ, y, x
    info = read_image_info(path)
    assert info.shape == (NY, NX)
    assert info.wcs.naxis == 2
    assert list(info.wcs.wcs.ctype) == ["RA---SIN", "DEC--SIN"]
    assert info.freq_hz == pytest.approx(1.4e9)  # from the FREQ axis in MHz, converted to Hz
    image = load_image(path)
    np.testing.assert_array_equal(image.data, data)


def test_cube_with_four_channels_rejected(tmp_path):
    path = write_image(tmp_path / "cube4.fits", cube=True, nfreq=4)
    err = assert_image_error(path, "non-degenerate axis 3 (FREQ, length 4)")
    assert "axis 3" in str(err)
    assert_image_error(path, "non-degenerate axis 3", reader=load_image)


def test_beam_in_arcsec_is_converted(tmp_path):
    path = write_image(tmp_path / "arcsec.fits", BMAJ=36.0, BMIN=18.0, BPA=-20.0)
    beam = read_image_info(path).beam
    assert beam.major_deg == pytest.approx(0.01)
    assert beam.minor_deg == pytest.approx(0.005)
    assert beam.pa_deg == -20.0


def test_bmin_larger_than_bmaj_is_swapped(tmp_path):
    beam = read_image_info(
        write_image(tmp_path / "swap.fits", BMAJ=0.005, BMIN=0.01, BPA=10.0)
    ).beam
    assert (beam.major_deg, beam.minor_deg, beam.pa_deg) == (0.01, 0.005, 100.0)


def test_time_from_date_obs_and_timesys(tmp_path):
    path = write_image(tmp_path / "date.fits", drop=("MJD-OBS",))
    info = read_image_info(path)
    assert info.mjd == pytest.approx(60370.5, abs=1e-9)
    # TIMESYS=TAI: 37 s ahead of UTC in 2024, so the UTC MJD is 37 s earlier.
    path = write_image(tmp_path / "tai.fits", drop=("MJD-OBS",), TIMESYS="TAI")
    info = read_image_info(path)
    assert (60370.5 - info.mjd) * 86400.0 == pytest.approx(37.0, abs=1e-3)
    assert info.date_obs.startswith("2024-03-01T11:59:23")


def test_mjd_obs_used_when_it_agrees_with_date_obs(tmp_path):
    # 0.4 s after DATE-OBS: within the 1 s agreement, and MJD-OBS (finer) is the value used.
    mjd = 60370.5 + 0.4 / 86400.0
    path = write_image(tmp_path / "mjd.fits", **{"MJD-OBS": mjd})
    assert read_image_info(path).mjd == pytest.approx(mjd, abs=1e-10)


def test_conflicting_mjd_obs_and_date_obs_rejected(tmp_path):
    # Formerly MJD-OBS silently won; now both values are named.
    path = write_image(tmp_path / "mjd.fits", **{"MJD-OBS": 60000.25})
    err = assert_image_error(
        path, "DATE-OBS '2024-03-01T12:00:00.000' and MJD-OBS 60000.25 disagree"
    )
    assert_image_error(path, err.reason, reader=load_image)


def test_date_only_date_obs_contains_mjd_obs(tmp_path):
    # AIPS writes DATE-OBS as a date only; MJD-OBS carries the time of day.
    path = write_image(tmp_path / "aips_date.fits", **{"DATE-OBS": "2024-03-01"})
    assert read_image_info(path).mjd == pytest.approx(60370.5, abs=1e-9)
    path = write_image(tmp_path / "aips_date2.fits", **{"DATE-OBS": "2024-03-02"})
    assert_image_error(path, "DATE-OBS '2024-03-02' and MJD-OBS 60370.5 disagree")


def test_frequency_absent_is_none(tmp_path):
    path = write_image(tmp_path / "nofreq.fits", drop=("RESTFRQ",))
    assert read_image_info(path).freq_hz is None


def test_nan_blanks_are_kept(tmp_path):
    data = np.random.default_rng(2).normal(0.0, 1e-3, (NY, NX)).astype(np.float32)
    data[:5] = np.nan
    image = load_image(write_image(tmp_path / "blank.fits", data))
    assert np.isnan(image.data[:5]).all() and np.isfinite(image.data[5:]).all()


def test_read_image_info_does_not_read_data(tmp_path):
    # Replace the data section by garbage of the same size: header-only reading cannot notice.
    path = write_image(tmp_path / "good.fits")
    raw = bytearray((tmp_path / "good.fits").read_bytes())
    header_len = len(fits.Header.fromfile(path).tostring())
    raw[header_len:] = b"\xff" * (len(raw) - header_len)
    (tmp_path / "good.fits").write_bytes(bytes(raw))
    assert read_image_info(path).shape == (NY, NX)


def test_load_image_opens_the_file_once(tmp_path, monkeypatch):
    import builtins
    import io

    path = write_image(tmp_path / "good.fits")
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def counting(opener):
        def wrapper(file, *args, **kwargs):
            if str(file) == path:
                opened.append(file)
            return opener(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(io, "open", counting(real_io_open))
    load_image(path)
    assert len(opened) == 1


# -- failures -------------------------------------------------------------------------------------


def test_not_a_fits_file(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("this is a text file, not an image\n" * 200)
    assert_image_error(text, "not a FITS file")
    assert_image_error(text, "not a FITS file", reader=load_image)


def test_corrupt_bytes(tmp_path):
    junk = tmp_path / "junk.fits"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    assert_image_error(junk, "not a FITS file")
    # A file that starts like FITS but whose header is garbage never reaches an END card.
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"SIMPLE  =                    T" + b"\x00\x01" * 4000)
    assert_image_error(garbage, "truncated or corrupt FITS file")


def test_truncated_copy_of_good_file(tmp_path):
    good = write_image(tmp_path / "good.fits")
    raw = (tmp_path / "good.fits").read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 2880 + 100):
        partial = tmp_path / f"partial_{cut}.fits"
        partial.write_bytes(raw[:cut])
        err = assert_image_error(partial, "truncated or corrupt FITS file")
        assert f"size {cut} bytes" in err.reason
        assert_image_error(partial, "truncated", reader=load_image)
    header_only = tmp_path / "header_only.fits"
    header_only.write_bytes(raw[:1000])  # cut inside the header
    assert_image_error(header_only, "truncated or corrupt FITS file")
    assert read_image_info(good).file_size == len(raw)


def test_missing_and_empty_file(tmp_path):
    assert_image_error(tmp_path / "absent.fits", "file not found")
    (tmp_path / "empty.fits").write_bytes(b"")
    assert_image_error(tmp_path / "empty.fits", "empty file")


def test_gzip_rejected_with_reason(tmp_path):
    gz = tmp_path / "image.fits.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    assert_image_error(gz, "gzip")


@pytest.mark.parametrize("key", ["BMAJ", "BMIN"])
def test_missing_beam_keyword(tmp_path, key):
    path = write_image(tmp_path / "nobeam.fits", drop=(key,))
    assert_image_error(path, f"missing beam keyword {key}")
    assert_image_error(path, f"missing beam keyword {key}", reader=load_image)


def test_missing_bpa_only_allowed_for_circular_beam(tmp_path):
    assert_image_error(
        write_image(tmp_path / "nobpa.fits", drop=("BPA",)), "missing beam keyword BPA"
    )
    circular = write_image(tmp_path / "circ.fits", drop=("BPA",), BMIN=0.01)
    assert read_image_info(circular).beam == Beam(0.01, 0.01, 0.0)


def test_bad_beam_value(tmp_path):
    assert_image_error(write_image(tmp_path / "neg.fits", BMAJ=-1.0), "bad beam keyword BMAJ")
    assert_image_error(write_image(tmp_path / "str.fits", BMIN="wide"), "bad keyword BMIN")


def test_missing_observation_time(tmp_path):
    path = write_image(tmp_path / "notime.fits", drop=("DATE-OBS", "MJD-OBS"))
    assert_image_error(path, "missing observation time (MJD-OBS or DATE-OBS)")


def test_unparseable_date_obs(tmp_path):
    path = write_image(tmp_path / "baddate.fits", drop=("MJD-OBS",), **{"DATE-OBS": "yesterday"})
    assert_image_error(path, "unparseable DATE-OBS 'yesterday'")


def test_unsupported_timesys(tmp_path):
    path = write_image(tmp_path / "gps.fits", TIMESYS="MARS")
    assert_image_error(path, "unsupported TIMESYS 'MARS'")


def test_no_ctype_means_no_celestial_wcs(tmp_path):
    path = write_image(tmp_path / "noctype.fits", drop=("CTYPE1", "CTYPE2"))
    assert_image_error(path, "no celestial WCS (CTYPE1/CTYPE2)")
    assert_image_error(path, "no celestial WCS", reader=load_image)


def test_all_nan_image(tmp_path):
    path = write_image(tmp_path / "nan.fits", np.full((NY, NX), np.nan, dtype=np.float32))
    assert read_image_info(path).shape == (NY, NX)  # the header is fine
    assert_image_error(path, "image is entirely NaN", reader=load_image)


def test_no_data_in_primary_hdu(tmp_path):
    path = tmp_path / "empty.fits"
    header = make_header()
    fits.HDUList(
        [fits.PrimaryHDU(header=header), fits.ImageHDU(np.zeros((NY, NX), dtype=np.float32))]
    ).writeto(path)
    assert_image_error(path, "no image data in primary HDU")
    assert_image_error(path, "no image data in primary HDU", reader=load_image)


def test_integer_image_scaled_to_float(tmp_path):
    path = tmp_path / "int.fits"
    hdu = fits.PrimaryHDU(
        data=np.arange(NY * NX, dtype=np.int16).reshape(NY, NX) % 100, header=make_header()
    )
    hdu.header["BSCALE"], hdu.header["BZERO"] = 1e-3, 0.0
    hdu.writeto(path)
    image = load_image(path)
    assert np.issubdtype(image.data.dtype, np.floating)
    assert image.data[0, 99 % NX] == pytest.approx((99 % NX) * 1e-3)

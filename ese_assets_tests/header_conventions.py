"""FITS images written in the header conventions of real writers, with injected point sources.

Independent of the code under test: the sky is built with astropy's high-level WCS API
(``pixel_to_world``/``world_to_pixel`` on SkyCoord, which follow the file's own axis order and
frame), and point sources are rendered as elliptical Gaussians in numpy from a pixel Jacobian
obtained with ``SkyCoord.directional_offset_by`` in the image's frame. Sources are placed at known
pixel positions (so which of them lie inside the image is known without any WCS), and the
catalog gets their ICRS positions.

Conventions (``ImageSpec``):

* ``frame``: ``'icrs'``, ``'fk5'`` (RADESYS FK5, EQUINOX 2000), ``'fk4'`` (RADESYS FK4,
  EQUINOX 1950, as AIPS and old VLA images), ``'fk5-aips'`` (EQUINOX 2000 and no RADESYS: FK5 by
  the FITS default), ``'galactic'`` (GLON/GLAT).
* ``axis_order``: ``'lon-lat'`` (usual), ``'lat-lon'`` (DEC as FITS axis 1),
  ``'freq-lon-lat'`` (a degenerate FREQ axis first).
* ``cube``: 4-D CASA layout (lon, lat, FREQ, STOKES) with length-1 spectral/Stokes axes.
* ``bunit``/``unit_scale``: the data are written as ``Jy/beam * unit_scale`` with that BUNIT.
* ``beam_style``: ``'deg'`` (BMAJ/BMIN/BPA in degrees), ``'arcsec'`` (BMAJ/BMIN in arcsec),
  ``'aips'`` (HISTORY cards only, AIPS CLEAN line in degrees after an arcsec CONVL line),
  ``'casa'`` (CASAMBM = T and a BEAMS binary table; no BMAJ keywords).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.coordinates import FK4, FK5, Galactic, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ese_assets.core.beam import FWHM_PER_SIGMA, Beam
from ese_assets.core.catalog import Catalog
from ese_assets.core.simulate import correlated_noise

ARCSEC = 1.0 / 3600.0
#: 30" x 20" at PA 35 deg: 5 x 3.3 pixels of the default 6" cells.
DEFAULT_BEAM = Beam(30.0 * ARCSEC, 20.0 * ARCSEC, 35.0)


@dataclass(frozen=True)
class ImageSpec:
    frame: str = "icrs"
    axis_order: str = "lon-lat"
    cube: bool = False
    bunit: str | None = "Jy/beam"
    unit_scale: float = 1.0
    beam_style: str = "deg"
    beam: Beam = DEFAULT_BEAM
    cell_deg: float = 6.0 * ARCSEC
    shape: tuple[int, int] = (140, 160)  # (n along latitude, n along longitude)
    center_icrs: tuple[float, float] = (150.0, 30.0)
    date_obs: str = "2024-03-01T04:05:06.000"
    rms_jyb: float = 1e-3
    extra: dict = field(default_factory=dict)
    # Width of the noise autocorrelation in beams (its covariance is noise_acf_scale^2 x the beam's;
    # 0: white noise). The noise is white noise convolved with a Gaussian of half that covariance.
    noise_acf_scale: float = 1.0


@dataclass(frozen=True)
class Field:
    """A written image and its truth: catalog (ICRS), fluxes, pixel positions, inside mask."""

    path: str
    catalog: Catalog
    flux_jy: np.ndarray
    x_lon_pix: np.ndarray  # 0-based pixel along the longitude axis
    y_lat_pix: np.ndarray  # 0-based pixel along the latitude axis
    inside: np.ndarray  # True where the source lies inside the image
    center_icrs_deg: tuple[float, float]  # ICRS of the central pixel
    mjd: float


def native_frame(name: str):
    return {
        "icrs": "icrs",
        "fk5": FK5(equinox="J2000"),
        "fk5-aips": FK5(equinox="J2000"),
        "fk4": FK4(equinox="B1950"),
        "galactic": Galactic(),
    }[name]


def _celestial_cards(spec: ImageSpec) -> tuple[list[tuple[str, object]], WCS]:
    """Celestial WCS cards in the file's axis order, and the matching 2-D astropy WCS."""
    centre = SkyCoord(*spec.center_icrs, unit="deg", frame="icrs").transform_to(
        native_frame(spec.frame)
    )
    lon0, lat0 = centre.spherical.lon.deg, centre.spherical.lat.deg
    n_lat, n_lon = spec.shape
    lon_type, lat_type = (
        ("GLON-SIN", "GLAT-SIN") if spec.frame == "galactic" else ("RA---SIN", "DEC--SIN")
    )
    lon_axis = {
        "type": lon_type,
        "val": lon0,
        "delt": -spec.cell_deg,
        "pix": n_lon / 2 + 0.5,
        "n": n_lon,
    }
    lat_axis = {
        "type": lat_type,
        "val": lat0,
        "delt": spec.cell_deg,
        "pix": n_lat / 2 + 0.5,
        "n": n_lat,
    }
    axes = [lat_axis, lon_axis] if spec.axis_order == "lat-lon" else [lon_axis, lat_axis]
    first = 2 if spec.axis_order == "freq-lon-lat" else 1
    cards: list[tuple[str, object]] = []
    for i, axis in enumerate(axes, start=first):
        cards += [
            (f"CTYPE{i}", axis["type"]),
            (f"CRVAL{i}", float(axis["val"])),
            (f"CDELT{i}", float(axis["delt"])),
            (f"CRPIX{i}", float(axis["pix"])),
            (f"CUNIT{i}", "deg"),
        ]
    cards += {
        "icrs": [("RADESYS", "ICRS")],
        "fk5": [("RADESYS", "FK5"), ("EQUINOX", 2000.0)],
        "fk5-aips": [("EQUINOX", 2000.0)],
        "fk4": [("RADESYS", "FK4"), ("EQUINOX", 1950.0)],
        "galactic": [],
    }[spec.frame]
    header = fits.Header()
    header["NAXIS"] = 2
    for i, axis in enumerate(axes, start=1):
        header[f"NAXIS{i}"] = axis["n"]
    for key, value in cards:  # the same cards renumbered to axes 1-2 for the 2-D WCS
        if key[-1].isdigit():
            key = key[:-1] + str(int(key[-1]) - first + 1)
        header[key] = value
    return cards, WCS(header)


def _beam_cov_pix(wcs2d: WCS, coords: SkyCoord, beam: Beam) -> np.ndarray:
    """(N, 2, 2) beam covariance in the file's pixel axes: C_pix = J C_sky J^T.

    J = d(pixel)/d(east, north) from +-h offsets along PA 90/270 and 0/180 in the image's frame.
    """
    h = 0.25 * beam.minor_deg * u.deg
    pix = []
    for pa in (90.0, 270.0, 0.0, 180.0):
        moved = coords.directional_offset_by(pa * u.deg, h)
        pix.append(np.array(wcs2d.world_to_pixel(moved)))  # (2, N)
    step = 2.0 * h.to_value(u.deg)
    jac = np.empty((len(coords), 2, 2))
    jac[:, :, 0] = ((pix[0] - pix[1]) / step).T
    jac[:, :, 1] = ((pix[2] - pix[3]) / step).T
    s_maj, s_min = beam.major_deg / FWHM_PER_SIGMA, beam.minor_deg / FWHM_PER_SIGMA
    pa = math.radians(beam.pa_deg)
    v = np.array([math.sin(pa), math.cos(pa)])  # major axis in (east, north)
    w = np.array([math.cos(pa), -math.sin(pa)])
    c_sky = s_maj**2 * np.outer(v, v) + s_min**2 * np.outer(w, w)
    return jac @ c_sky @ np.swapaxes(jac, 1, 2)


def _render(shape_file: tuple[int, int], p1, p2, cov, flux) -> np.ndarray:
    """Sum of Gaussians exp(-d^T C^-1 d / 2) * flux on an array [axis2, axis1] (numpy order)."""
    n2, n1 = shape_file
    g2, g1 = np.mgrid[0:n2, 0:n1]
    image = np.zeros(shape_file)
    icov = np.linalg.inv(cov)
    for a, b, ic, f in zip(p1, p2, icov, flux, strict=True):
        d1, d2 = g1 - a, g2 - b
        q = ic[0, 0] * d1**2 + 2 * ic[0, 1] * d1 * d2 + ic[1, 1] * d2**2
        image += f * np.exp(-0.5 * q)
    return image


def _beams_table(beam: Beam) -> fits.BinTableHDU:
    """CASA's per-plane beam table: BMAJ/BMIN in arcsec, BPA in deg, CHAN, POL (one plane)."""
    columns = [
        fits.Column(name="BMAJ", format="1E", unit="arcsec", array=[beam.major_deg * 3600.0]),
        fits.Column(name="BMIN", format="1E", unit="arcsec", array=[beam.minor_deg * 3600.0]),
        fits.Column(name="BPA", format="1E", unit="deg", array=[beam.pa_deg]),
        fits.Column(name="CHAN", format="1J", array=[0]),
        fits.Column(name="POL", format="1J", array=[0]),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="BEAMS")
    table.header["NCHAN"], table.header["NPOL"] = 1, 1
    return table


def _beam_cards(spec: ImageSpec) -> list[tuple[str, object]]:
    beam = spec.beam
    if spec.beam_style == "deg":
        return [("BMAJ", beam.major_deg), ("BMIN", beam.minor_deg), ("BPA", beam.pa_deg)]
    if spec.beam_style == "arcsec":
        return [
            ("BMAJ", beam.major_deg * 3600.0),
            ("BMIN", beam.minor_deg * 3600.0),
            ("BPA", beam.pa_deg),
        ]
    if spec.beam_style == "aips":
        return [
            ("HISTORY", "AIPS   IMNAME='FIELD_1     ' IMCLASS='ICL001' IMSEQ=   1     /"),
            # A task's own beam, in arcsec: not this image's restoring beam.
            ("HISTORY", "CONVL BMAJ=  2.9700 BMIN=  1.6500 BPA= -15.1/Output beam"),
            (
                "HISTORY",
                f"AIPS   CLEAN BMAJ=  {beam.major_deg:.4E} BMIN=  {beam.minor_deg:.4E} "
                f"BPA= {beam.pa_deg:6.2f}",
            ),
            ("HISTORY", "AIPS   CLEAN NITER=     1000 PRODUCT=1   / NORMAL"),
        ]
    if spec.beam_style == "casa":
        return [("CASAMBM", True)]
    raise ValueError(spec.beam_style)


def write_field(
    path, spec: ImageSpec, *, seed: int = 1, spacing_pix: float = 22.0, margin_pix: float = 12.0
) -> Field:
    """Write an image of ``spec`` with sources on a jittered pixel grid; return it and its truth.

    The grid extends ``2 * spacing_pix`` beyond the image on every side, so some catalog sources
    fall outside (they must not be selected); those inside are at least ``margin_pix`` from every
    edge, those outside more than 3 pixels beyond one.
    """
    rng = np.random.default_rng(seed)
    cards, wcs2d = _celestial_cards(spec)
    n_lat, n_lon = spec.shape
    gx = np.arange(margin_pix - 2 * spacing_pix, n_lon - margin_pix + 2 * spacing_pix, spacing_pix)
    gy = np.arange(margin_pix - 2 * spacing_pix, n_lat - margin_pix + 2 * spacing_pix, spacing_pix)
    xs, ys = np.meshgrid(gx, gy)
    x_lon = xs.ravel() + rng.uniform(-3, 3, xs.size)
    y_lat = ys.ravel() + rng.uniform(-3, 3, ys.size)
    # Inside: at least margin_pix from every edge (the photometry stamp fits); outside: more
    # than 3 pixels beyond an edge. Nothing is ambiguously on an edge line.
    inside = (
        (x_lon >= margin_pix)
        & (x_lon <= n_lon - 1 - margin_pix)
        & (y_lat >= margin_pix)
        & (y_lat <= n_lat - 1 - margin_pix)
    )
    outside = (x_lon < -3) | (x_lon > n_lon + 2) | (y_lat < -3) | (y_lat > n_lat + 2)
    keep = inside | outside
    x_lon, y_lat, inside = x_lon[keep], y_lat[keep], inside[keep]
    flux = rng.uniform(0.02, 0.2, x_lon.size)  # 20-200 sigma at 1 mJy/beam
    lat_first = spec.axis_order == "lat-lon"
    p1, p2 = (y_lat, x_lon) if lat_first else (x_lon, y_lat)
    coords = wcs2d.pixel_to_world(p1, p2)  # SkyCoord in the image's frame
    icrs = coords.icrs
    shape_file = (n_lon, n_lat) if lat_first else (n_lat, n_lon)  # numpy (axis2, axis1)
    cov = _beam_cov_pix(wcs2d, coords, spec.beam)
    sky = _render(shape_file, p1, p2, cov, flux)
    centre_pix = ((shape_file[1] - 1) / 2.0, (shape_file[0] - 1) / 2.0)
    noise_cov = _beam_cov_pix(
        wcs2d, wcs2d.pixel_to_world([centre_pix[0]], [centre_pix[1]]), spec.beam
    )[0]
    sky += correlated_noise(shape_file, noise_cov * spec.noise_acf_scale**2, spec.rms_jyb, rng)
    data = (sky * spec.unit_scale).astype(np.float32)

    header = fits.Header()
    for key, value in cards:
        header[key] = value
    if spec.axis_order == "freq-lon-lat":
        header["CTYPE1"], header["CRVAL1"], header["CDELT1"] = "FREQ", 1.4e9, 1e6
        header["CRPIX1"], header["CUNIT1"] = 1.0, "Hz"
        data = data[:, :, None]
    elif spec.cube:
        for key, value in (
            ("CTYPE3", "FREQ"),
            ("CRVAL3", 1.4e9),
            ("CDELT3", 1e6),
            ("CRPIX3", 1.0),
            ("CUNIT3", "Hz"),
            ("CTYPE4", "STOKES"),
            ("CRVAL4", 1.0),
            ("CDELT4", 1.0),
            ("CRPIX4", 1.0),
        ):
            header[key] = value
        data = data[None, None]
    if spec.bunit is not None:
        header["BUNIT"] = spec.bunit
    time = Time(spec.date_obs, scale="utc")
    header["DATE-OBS"] = spec.date_obs
    header["MJD-OBS"] = float(time.mjd)
    header["TIMESYS"] = "UTC"
    for key, value in _beam_cards(spec):
        if key == "HISTORY":
            header.add_history(value)
        else:
            header[key] = value
    for key, value in spec.extra.items():
        header[key] = value
    hdus = [fits.PrimaryHDU(data=data, header=header)]
    if spec.beam_style == "casa":
        hdus.append(_beams_table(spec.beam))
    fits.HDUList(hdus).writeto(path, overwrite=True)

    centre = wcs2d.pixel_to_world(*centre_pix).icrs
    catalog = Catalog(
        source_id=np.array([f"S{i:04d}" for i in range(flux.size)], dtype=object),
        ra_deg=icrs.ra.deg,
        dec_deg=icrs.dec.deg,
        flux_mjy=flux * 1e3,
        path="injected",
    )
    return Field(
        path=str(path),
        catalog=catalog,
        flux_jy=flux,
        x_lon_pix=x_lon,
        y_lat_pix=y_lat,
        inside=inside,
        center_icrs_deg=(float(centre.ra.deg), float(centre.dec.deg)),
        mjd=float(time.mjd),
    )

"""Celestial frames of image WCSs: catalog (ICRS) positions in the image's frame and back.

An image's WCS may be equatorial in ICRS, FK5 (``RADESYS = 'FK5'``, ``EQUINOX`` in Julian years)
or FK4 (``RADESYS = 'FK4'``/``'FK4-NO-E'``, ``EQUINOX`` in Besselian years, e.g. 1950), or Galactic
(``GLON``/``GLAT``). The frame is what astropy's ``wcs_to_celestial_frame`` says, which applies the
FITS defaults (no ``RADESYS``: ICRS without ``EQUINOX``, FK4 when ``EQUINOX < 1984``, else FK5);
FK4's ``obstime`` is its equinox (B1950), the usual reading of B1950 catalogs and AIPS headers.
Galactic is decided by the axis types alone, whatever ``RADESYS`` says (it applies to equatorial
coordinates only). Other frames (ecliptic, planetary, terrestrial...) are rejected.

Catalogs and the products database hold ICRS RA/Dec; images are measured in their own frame:
:func:`icrs_to_frame` converts a whole array of catalog positions with one astropy transform per
call (vectorized; ICRS images skip it), :func:`frame_to_icrs` converts back. FK4 to ICRS moves
positions by ~0.5 deg (precession from B1950 to J2000), Galactic is a different sphere altogether.

Pixel positions: :func:`world_to_pixel` and :func:`pixel_to_world` take (lon, lat) in the WCS's
frame whatever the order of its two axes (astropy's ``*_values`` methods use the WCS's own order).
"""

from __future__ import annotations

import math

import numpy as np
from astropy import units as u
from astropy.coordinates import ICRS, Galactic, SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import wcs_to_celestial_frame

#: Frames whose transform to and from ICRS astropy implements and whose axes we accept.
SUPPORTED_FRAMES = ("icrs", "fk5", "fk4", "fk4noeterms", "galactic")


class FrameError(ValueError):
    """The WCS's celestial frame is not one the pipeline can transform catalog positions into."""


def celestial_frame(wcs: WCS):
    """The astropy frame of a celestial WCS (ICRS, FK5, FK4, FK4NoETerms or Galactic).

    Raises :class:`FrameError` naming the axis types and ``RADESYS`` for anything else.
    """
    lng, lat = wcs.wcs.lng, wcs.wcs.lat
    if lng < 0 or lat < 0:
        raise FrameError("no celestial axes")
    lon_type = wcs.wcs.ctype[lng][:4].rstrip("-").upper()
    lat_type = wcs.wcs.ctype[lat][:4].rstrip("-").upper()
    if (lon_type, lat_type) == ("GLON", "GLAT"):
        return Galactic()
    try:
        frame = wcs_to_celestial_frame(wcs)
    except Exception:  # astropy raises ValueError or its own errors for unknown systems
        frame = None
    if frame is None or frame.name not in SUPPORTED_FRAMES or (lon_type, lat_type) != ("RA", "DEC"):
        radesys = wcs.wcs.radesys.strip() or "none"
        raise FrameError(
            f"unsupported celestial frame ({lon_type}/{lat_type}, RADESYS {radesys}; "
            "expected RA/DEC in ICRS, FK5 or FK4, or GLON/GLAT)"
        )
    return frame


def frame_name(wcs: WCS) -> str:
    """Short name of the WCS's frame, e.g. ``'icrs'``, ``'fk4 B1950.000'``, ``'galactic'``."""
    frame = celestial_frame(wcs)
    equinox = getattr(frame, "equinox", None)
    if equinox is None:
        return frame.name
    return (
        f"{frame.name} {equinox.byear_str if frame.name.startswith('fk4') else equinox.jyear_str}"
    )


def _is_icrs(frame) -> bool:
    return isinstance(frame, ICRS)


def icrs_to_frame(wcs: WCS, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in degrees -> (lon, lat) in degrees in the frame of ``wcs`` (arrays).

    One vectorized astropy transform for all positions; lon is wrapped into [0, 360).
    """
    ra = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
    frame = celestial_frame(wcs)
    if _is_icrs(frame) or ra.size == 0:
        return ra, dec
    native = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs").transform_to(frame)
    return (native.spherical.lon.to_value(u.deg) % 360.0, native.spherical.lat.to_value(u.deg))


def frame_to_icrs(wcs: WCS, lon_deg, lat_deg) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees in the frame of ``wcs`` -> ICRS (ra, dec) in degrees (arrays)."""
    lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
    lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
    frame = celestial_frame(wcs)
    if _is_icrs(frame) or lon.size == 0:
        return lon, lat
    finite = np.isfinite(lon) & np.isfinite(lat)
    ra, dec = np.full(lon.shape, np.nan), np.full(lat.shape, np.nan)
    if finite.any():  # astropy refuses NaN latitudes in some frames' validators
        icrs = SkyCoord(lon[finite] * u.deg, lat[finite] * u.deg, frame=frame).icrs
        ra[finite] = icrs.ra.to_value(u.deg) % 360.0
        dec[finite] = icrs.dec.to_value(u.deg)
    return ra, dec


def world_to_pixel(wcs: WCS, lon_deg, lat_deg) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel (x, y) of (lon, lat) in the WCS's frame, whatever its axis order."""
    world = [None, None]
    world[wcs.wcs.lng] = np.asarray(lon_deg, dtype=np.float64)
    world[wcs.wcs.lat] = np.asarray(lat_deg, dtype=np.float64)
    x, y = wcs.world_to_pixel_values(*world)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def pixel_to_world(wcs: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees in the WCS's frame of 0-based pixel (x, y), whatever its axis order."""
    world = wcs.pixel_to_world_values(
        np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    )
    return (
        np.asarray(world[wcs.wcs.lng], dtype=np.float64),
        np.asarray(world[wcs.wcs.lat], dtype=np.float64),
    )


def angular_distance_deg(ra1_deg, dec1_deg, ra2_deg, dec2_deg) -> np.ndarray:
    """Great-circle distance in degrees (haversine formula; stable at small separations)."""
    ra1, dec1, ra2, dec2 = (
        np.radians(np.asarray(v, dtype=np.float64)) for v in (ra1_deg, dec1_deg, ra2_deg, dec2_deg)
    )
    h = (
        np.sin((dec2 - dec1) / 2.0) ** 2
        + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2.0) ** 2
    )
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def image_center_and_radius(wcs: WCS, shape: tuple[int, int]) -> tuple[float, float, float]:
    """ICRS (ra_deg, dec_deg) of the central pixel and the largest distance (deg) to a corner.

    ``shape`` is (ny, nx) with x along the WCS's first pixel axis. The centre is pixel
    ((nx - 1)/2, (ny - 1)/2) (0-based); corners are the outer pixel edges (-0.5 and n - 0.5), so
    every pixel centre lies inside the circle. The five points are computed in the image's frame
    and converted to ICRS in one transform, so the circle is an ICRS cone (what the catalog's
    index searches). A corner that does not project onto the sky (huge SIN fields) gives radius
    180 deg, i.e. "whole sky", never too small. Distances use the haversine formula.
    Raises ValueError when the centre itself does not project, FrameError for unknown frames.
    """
    ny, nx = shape
    x = np.array([(nx - 1) / 2.0, -0.5, nx - 0.5, -0.5, nx - 0.5])
    y = np.array([(ny - 1) / 2.0, -0.5, -0.5, ny - 0.5, ny - 0.5])
    lon, lat = pixel_to_world(wcs, x, y)
    if not (math.isfinite(lon[0]) and math.isfinite(lat[0])):
        raise ValueError("the image centre does not project onto the sky")
    ra_deg, dec_deg = frame_to_icrs(wcs, lon, lat)
    ra_c, dec_c = float(ra_deg[0]), float(dec_deg[0])
    sep = angular_distance_deg(ra_c, dec_c, ra_deg[1:], dec_deg[1:])
    radius = float(np.max(sep)) if np.isfinite(sep).all() else 180.0
    return ra_c % 360.0, dec_c, radius

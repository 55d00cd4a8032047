"""Elliptical Gaussian restoring beam: the one definition shared by photometry and the simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: FWHM = FWHM_PER_SIGMA * sigma for a Gaussian (2 sqrt(2 ln 2)).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class Beam:
    """Restoring beam: FWHM major/minor axes in degrees, position angle in degrees east of north.

    "North" is the north of the image's own celestial frame (Galactic north for a GLON/GLAT
    image), as AIPS and CASA define BPA.
    """

    major_deg: float
    minor_deg: float
    pa_deg: float


def ordered_beam(major_deg: float, minor_deg: float, pa_deg: float) -> Beam:
    """The beam with ``major >= minor`` (swapped axes: the same ellipse rotated by 90 deg)."""
    if minor_deg > major_deg:
        return Beam(major_deg=minor_deg, minor_deg=major_deg, pa_deg=pa_deg + 90.0)
    return Beam(major_deg=major_deg, minor_deg=minor_deg, pa_deg=pa_deg)


def beam_covariance_sky(beam) -> np.ndarray:
    """Beam covariance (2x2, deg^2) in local (east, north) offsets.

    ``beam`` has ``major_deg``, ``minor_deg`` (FWHM) and ``pa_deg`` (BPA, from north through east).
    sigma = FWHM / (2 sqrt(2 ln 2)); the major axis points along v = (sin BPA, cos BPA) in
    (east, north), the minor axis along w = (cos BPA, -sin BPA): C = s_maj^2 v v^T + s_min^2 w w^T.
    """
    s_maj = float(beam.major_deg) / FWHM_PER_SIGMA
    s_min = float(beam.minor_deg) / FWHM_PER_SIGMA
    pa = math.radians(float(beam.pa_deg))
    v = np.array([math.sin(pa), math.cos(pa)])
    w = np.array([math.cos(pa), -math.sin(pa)])
    return s_maj**2 * np.outer(v, v) + s_min**2 * np.outer(w, w)

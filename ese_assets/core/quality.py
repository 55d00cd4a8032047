"""Quality flags of a forced-photometry measurement, and which measurements statistics may use.

A measurement's ``quality_flag`` (stored in ``photometry.quality_flag``) is the OR of these bits:

====  ===============  ==========================================================================
bit   name             meaning
====  ===============  ==========================================================================
1     ``FLAG_EDGE``    the stamp leaves the image (or the position is not finite): no flux (NaN)
2     ``FLAG_NAN``     some stamp pixels are blank (NaN); they get zero weight, the flux and its
                       error are still valid (the error is computed over the unblanked pixels)
4     ``FLAG_BLENDED`` another source lies within 1.5 beam majors; the amplitudes were fitted
                       jointly, so the flux is unbiased and its error includes the covariance
8     ``FLAG_BLANK``   the source's own pixel is blank, or blank pixels carry more than
                       ``MAX_BLANK_FRACTION`` of the beam weight ``sum K^2`` of its stamp: the
                       image did not observe the source, so there is no flux (NaN)
16    ``FLAG_BAD_GAIN`` the image's flux-scale calibration failed (``core.calibration``: its
                       gain is an outlier, or its reference sources scatter far more than
                       usual); set on every row of the image by the calibration step
====  ===============  ==========================================================================

``FLAG_EDGE`` and ``FLAG_BLANK`` mark positions that were not measured (no flux); ``FLAG_NAN`` and
``FLAG_BLENDED`` mark real measurements with honest errors. Statistics and detection use only the
measurements for which :func:`usable_measurement` is true; the excluded bits are configurable
(``ESE_EXCLUDE_FLAGS``), by default ``DEFAULT_EXCLUDED_FLAGS = FLAG_EDGE | FLAG_BLANK |
FLAG_BAD_GAIN``. A bad image is excluded rather than down-weighted: its one gain does not describe
it (that is what makes it bad), and any weight left would still move all its sources together,
the dip in every source the calibration exists to prevent. Blended
measurements are not excluded by default: a joint fit is the correct measurement of a close pair,
and dropping them would silently remove every source with a neighbour.
"""

from __future__ import annotations

import numpy as np

FLAG_EDGE = 1
FLAG_NAN = 2
FLAG_BLENDED = 4
FLAG_BLANK = 8
FLAG_BAD_GAIN = 16

#: Every defined bit; a flag outside this mask is not a quality flag of this project.
ALL_FLAGS = FLAG_EDGE | FLAG_NAN | FLAG_BLENDED | FLAG_BLANK | FLAG_BAD_GAIN

#: Measurements with any of these bits are left out of statistics and detection by default.
DEFAULT_EXCLUDED_FLAGS = FLAG_EDGE | FLAG_BLANK | FLAG_BAD_GAIN

#: A measurement is blank when blank pixels carry more than this fraction of the beam weight
#: sum(K^2) of its stamp (or its own pixel is blank). At 0.5 the estimator's white-noise error has
#: grown by at most sqrt(2); beyond it the fit rests on the beam's wings, where
#: F = sum(d K)/sum(K^2) divides noise by a vanishing sum(K^2) (on a single-dish map with 40 %
#: blank pixels this produced fluxes of 10^5 Jy at an RMS of 0.05 Jy/beam).
MAX_BLANK_FRACTION = 0.5


def usable_measurement(quality_flag, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS):
    """True where a measurement may enter statistics and detection: ``flag & exclude_flags == 0``.

    Vectorized over ``quality_flag`` (an int or an integer array); the SQL form of the same test is
    ``quality_flag.bitwise_and(exclude_flags) == 0``.
    """
    flags = np.asarray(quality_flag, dtype=np.int64)
    usable = (flags & int(exclude_flags)) == 0
    return bool(usable) if usable.ndim == 0 else usable


def validate_exclude_flags(exclude_flags: int) -> int:
    """The exclusion mask as an int, or ValueError naming the problem (unknown or negative bits)."""
    mask = int(exclude_flags)
    if mask < 0 or mask & ~ALL_FLAGS:
        raise ValueError(
            f"exclude flags must be a combination of the quality bits {FLAG_EDGE} (edge), "
            f"{FLAG_NAN} (blank pixels in the stamp), {FLAG_BLENDED} (blended), {FLAG_BLANK} "
            f"(blank), {FLAG_BAD_GAIN} (image with a bad gain), i.e. 0..{ALL_FLAGS}; "
            f"got {exclude_flags}"
        )
    return mask

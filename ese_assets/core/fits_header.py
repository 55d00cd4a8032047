"""Header conventions of radio images: brightness unit, restoring beam, observation time.

Each reader takes a parsed :class:`astropy.io.fits.Header` (plus what it needs from the WCS) and
returns a value or raises :class:`ImageError` naming the file and the problem.

Brightness unit (:func:`jyb_per_unit`): ``BUNIT`` Jy/beam, mJy/beam or uJy/beam in the common
spellings (``JY/BEAM``, ``Jy/Beam``, ``mJy/beam``, ``uJy/beam``, ``UJY/BEAM``, ``microJy/beam``,
``Jy beam-1``...); other astropy-parseable units equivalent to Jy/beam are converted too. A
missing or blank ``BUNIT`` means Jy/beam (what the pipeline always assumed). Anything else (K,
Jy/pixel, MJy/sr, ...) is rejected with the unit named; so is the all-capitals ``MJY/BEAM``, which
could mean milli or mega.

Beam (:func:`beam_from_keywords`, :func:`beam_from_aips_history`, :func:`beam_from_beams_table`):

* ``BMAJ``/``BMIN`` FWHM and ``BPA`` (degrees east of north). The FITS convention is degrees; some
  writers put arcseconds there. The unit is decided against the pixel scale: read as degrees, a
  beam spans ``BMAJ / pixel`` pixels. Real images sample the beam with a few pixels (at most a few
  hundred), while an arcsec value misread as degrees is 3600 times too large, i.e. more than
  :data:`BEAM_MAX_PIXELS_IF_DEGREES` pixels for any beam wider than a sixth of a pixel. So a
  degree reading above that many pixels means arcsec. A fixed cut in degrees (e.g. "BMAJ > 2 is
  arcsec") cannot work: a 0.8 arcsec beam written in arcsec is 0.8 "degrees".
  ``BPA`` may be absent only for a circular beam.
* AIPS keeps the beam in ``HISTORY`` cards only: ``AIPS   CLEAN BMAJ=  8.2477E-04 BMIN=
  4.5736E-04 BPA= -15.06`` (degrees). The last such card is the beam of the final CLEAN. Other
  tasks' cards (e.g. ``CONVL BMAJ= 2.97 ...`` in arcsec) are not beams of this image and ignored.
* CASA multi-beam images (``CASAMBM = T``) have no ``BMAJ`` but a ``BEAMS`` binary table with
  columns ``BMAJ``, ``BMIN`` (``TUNIT`` arcsec), ``BPA`` (deg), ``CHAN``, ``POL``, one row per
  channel and polarisation. The pipeline accepts single-plane images only, so the table must
  describe that plane: one row, or the row with ``CHAN = 0`` and ``POL = 0``.
* If ``BMIN > BMAJ`` the axes are swapped and the PA rotated by 90 deg (the same ellipse).

Observation time (:func:`observation_time`): ``DATE-OBS`` (ISO 8601) and/or ``MJD-OBS``, both in
the time scale named by ``TIMESYS`` (default UTC, as the FITS standard says), converted to UTC.
When both are present they must agree within :data:`TIME_AGREEMENT_S` (1 s), or the image is
rejected naming both values; a date-only ``DATE-OBS`` (``2010-01-22``, as AIPS writes, or the
pre-2000 form ``22/01/98``) must contain the ``MJD-OBS`` instant. ``MJD-OBS`` is then used (it
carries the time of day). This is the observation start, never the processing time.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.time import Time

from ese_assets.core.beam import Beam, ordered_beam
from ese_assets.core.errors import InputError


class ImageError(InputError):
    """An image that cannot be used, with the reason; ``str(err) == f"{path}: {reason}"``."""


#: A BMAJ read as degrees that spans more pixels than this is in arcsec (see module docstring).
BEAM_MAX_PIXELS_IF_DEGREES = 600.0
ARCSEC_PER_DEG = 3600.0
#: DATE-OBS and MJD-OBS further apart than this (seconds) contradict each other.
TIME_AGREEMENT_S = 1.0
SECONDS_PER_DAY = 86400.0
#: TIMESYS values understood by astropy Time (FITS names, upper case) -> astropy scale names.
TIME_SCALES = {
    "UTC": "utc",
    "TAI": "tai",
    "TT": "tt",
    "TDT": "tt",
    "ET": "tt",
    "TDB": "tdb",
    "TCG": "tcg",
    "TCB": "tcb",
    "UT1": "ut1",
    "UT": "utc",
}

#: Jy/beam spellings: an SI prefix (case kept: 'M' would be mega) before Jy/beam in any case.
_PER_BEAM = re.compile(
    r"^(?P<prefix>|m|u|U|(?i:micro|milli))"
    r"(?i:jy(/beam|beam\^?-1|beam\*\*-1))$"
)
_PREFIX_SCALE = {"": 1.0, "m": 1e-3, "milli": 1e-3, "u": 1e-6, "micro": 1e-6}
_JY_PER_BEAM = u.Jy / u.beam
#: ``AIPS   CLEAN BMAJ=  1.2500E-02 BMIN=  1.0000E-02 BPA=  45.00`` (HISTORY card value).
#: The original FITS date form (valid for 1900-1999 only), still found in old archive images.
_OLD_FITS_DATE = re.compile(r"^(\d\d)/(\d\d)/(\d\d)$")
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][-+]?\d+)?)"
_AIPS_CLEAN_BEAM = re.compile(
    rf"^\s*AIPS\s+CLEAN\s+BMAJ\s*=\s*{_NUMBER}\s+BMIN\s*=\s*{_NUMBER}"
    rf"\s+BPA\s*=\s*{_NUMBER}",
    re.IGNORECASE,
)


def float_keyword(path: str, header: fits.Header, key: str) -> float | None:
    """A finite float keyword, None when absent; ImageError when present but not a finite number."""
    if key not in header:
        return None
    value = header[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageError(path, f"bad keyword {key} = {value!r} (not a number)") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ImageError(path, f"bad keyword {key} = {value!r} (not a finite number)")
    return number


# --------------------------------------------------------------------------------------------------
# Brightness unit
# --------------------------------------------------------------------------------------------------


def jyb_per_unit(path: str, header: fits.Header) -> float:
    """Factor converting the data to Jy/beam, from ``BUNIT`` (see the module docstring)."""
    raw = header.get("BUNIT")
    text = "" if raw is None else str(raw).strip()
    if not text:
        return 1.0
    compact = re.sub(r"[\s.]", "", text)
    match = _PER_BEAM.match(compact)
    if match:
        return _PREFIX_SCALE[match.group("prefix").lower()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's UnitsWarning for non-standard spellings
            return float(u.Unit(text).to(_JY_PER_BEAM))
    except (ValueError, TypeError, u.UnitsError):
        raise ImageError(
            path, f"unsupported BUNIT '{text}' (expected Jy/beam, mJy/beam or uJy/beam)"
        ) from None


# --------------------------------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------------------------------


def _positive(path: str, what: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ImageError(path, f"bad beam {what} = {value} (must be > 0)")
    return value


def beam_from_keywords(path: str, header: fits.Header, pixel_scale_deg: float) -> Beam | None:
    """Beam from BMAJ/BMIN/BPA, or None when neither BMAJ nor BMIN is present.

    Degrees unless that reading spans more than :data:`BEAM_MAX_PIXELS_IF_DEGREES` pixels of
    ``pixel_scale_deg`` (then both axes are arcsec). BPA is always degrees.
    """
    major = float_keyword(path, header, "BMAJ")
    minor = float_keyword(path, header, "BMIN")
    if major is None and minor is None:
        return None
    for key, value in (("BMAJ", major), ("BMIN", minor)):
        if value is None:
            raise ImageError(path, f"missing beam keyword {key}")
        if value <= 0:
            raise ImageError(path, f"bad beam keyword {key} = {value} (must be > 0)")
    pa = float_keyword(path, header, "BPA")
    if pa is None:
        if major != minor:
            raise ImageError(path, "missing beam keyword BPA (beam is elliptical)")
        pa = 0.0
    if max(major, minor) / pixel_scale_deg > BEAM_MAX_PIXELS_IF_DEGREES:
        major, minor = major / ARCSEC_PER_DEG, minor / ARCSEC_PER_DEG
    return ordered_beam(major, minor, pa)


def beam_from_aips_history(path: str, header: fits.Header) -> Beam | None:
    """Beam of the last ``AIPS CLEAN BMAJ= .. BMIN= .. BPA= ..`` HISTORY card (degrees), if any."""
    found = None
    for card in header.get("HISTORY", []):
        match = _AIPS_CLEAN_BEAM.match(str(card))
        if match:
            found = match
    if found is None:
        return None
    major, minor, pa = (float(v.upper().replace("D", "E")) for v in found.groups())
    return ordered_beam(
        _positive(path, "BMAJ in AIPS HISTORY", major),
        _positive(path, "BMIN in AIPS HISTORY", minor),
        pa,
    )


def _column_deg(
    path: str, table: fits.BinTableHDU, name: str, default_unit: u.UnitBase
) -> np.ndarray:
    """A BEAMS table column in degrees, from its TUNIT (AIPS writes 'DEGREES') or the default."""
    names = {n.upper(): n for n in table.columns.names}
    if name not in names:
        raise ImageError(
            path,
            f"CASA BEAMS table has no {name} column (columns: {', '.join(table.columns.names)})",
        )
    column = table.columns[names[name]]
    text = str(column.unit or "").strip()
    unit = default_unit
    if text:
        lowered = text.lower()
        if lowered in ("deg", "degree", "degrees"):
            unit = u.deg
        elif lowered in ("arcsec", "arcsecond", "arcseconds", "asec"):
            unit = u.arcsec
        else:
            try:
                unit = u.Unit(text)
                unit.to(u.deg)
            except (ValueError, TypeError, u.UnitsError):
                raise ImageError(
                    path, f"CASA BEAMS table column {name} has unit '{text}' (expected an angle)"
                ) from None
    values = np.asarray(table.data[names[name]], dtype=np.float64).ravel()
    return values * float(unit.to(u.deg))


def beam_from_beams_table(path: str, table: fits.BinTableHDU) -> Beam:
    """The beam of a single-plane image from a CASA ``BEAMS`` table (see the module docstring)."""
    major = _column_deg(path, table, "BMAJ", u.arcsec)
    minor = _column_deg(path, table, "BMIN", u.arcsec)
    pa = _column_deg(path, table, "BPA", u.deg)
    rows = np.arange(major.size)
    if major.size != 1:
        names = {n.upper(): n for n in table.columns.names}
        chan = np.asarray(table.data[names["CHAN"]]) if "CHAN" in names else None
        pol = np.asarray(table.data[names["POL"]]) if "POL" in names else None
        if chan is None or pol is None:
            raise ImageError(
                path,
                f"CASA BEAMS table has {major.size} rows but no CHAN/POL "
                "columns to pick the image's plane",
            )
        rows = rows[(chan == 0) & (pol == 0)]
        if rows.size != 1:
            raise ImageError(
                path,
                f"CASA BEAMS table has {major.size} rows and {rows.size} for "
                "channel 0, polarisation 0 (expected exactly one)",
            )
    i = int(rows[0])
    if not math.isfinite(pa[i]):
        raise ImageError(path, f"bad beam BPA in CASA BEAMS table ({pa[i]})")
    return ordered_beam(
        _positive(path, "BMAJ in CASA BEAMS table", float(major[i])),
        _positive(path, "BMIN in CASA BEAMS table", float(minor[i])),
        float(pa[i]),
    )


def missing_beam_error(path: str, header: fits.Header) -> ImageError:
    """The error for an image with no beam anywhere (keywords, HISTORY, BEAMS table)."""
    hint = (
        " and no CASA BEAMS table although CASAMBM = T"
        if header.get("CASAMBM")
        else "; no AIPS CLEAN HISTORY card or CASA BEAMS table either"
    )
    return ImageError(path, f"missing beam keyword BMAJ{hint}")


# --------------------------------------------------------------------------------------------------
# Observation time
# --------------------------------------------------------------------------------------------------


def _parse_time(path: str, what: str, make) -> Time:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ERFA "dubious year" past the leap-second table
            return make().utc
    except Exception:  # astropy raises ValueError/TypeError, ERFA its own errors
        raise ImageError(path, f"unparseable {what}") from None


def _iso_date(text: str) -> str:
    """DATE-OBS as ISO 8601: the pre-2000 FITS form ``DD/MM/YY`` means 19YY-MM-DD."""
    old = _OLD_FITS_DATE.match(text)
    return f"19{old.group(3)}-{old.group(2)}-{old.group(1)}" if old else text


def observation_time(path: str, header: fits.Header) -> Time:
    """Observation start as an astropy Time in UTC (see the module docstring)."""
    timesys = str(header.get("TIMESYS", "UTC")).strip().upper()
    if timesys not in TIME_SCALES:
        raise ImageError(path, f"unsupported TIMESYS '{timesys}'")
    scale = TIME_SCALES[timesys]
    mjd = float_keyword(path, header, "MJD-OBS")
    date_obs = header.get("DATE-OBS")
    if mjd is None and date_obs is None:
        raise ImageError(path, "missing observation time (MJD-OBS or DATE-OBS)")
    from_mjd = from_date = None
    if mjd is not None:
        from_mjd = _parse_time(path, f"MJD-OBS {mjd}", lambda: Time(mjd, format="mjd", scale=scale))
    if date_obs is not None:
        text = _iso_date(str(date_obs).strip())
        from_date = _parse_time(path, f"DATE-OBS '{date_obs}'", lambda: Time(text, scale=scale))
    if from_mjd is None:
        return from_date
    if from_date is None:
        return from_mjd
    date_only = len(text) == len("YYYY-MM-DD")  # the day, not an instant
    delta_s = (from_mjd - from_date).to_value(u.s)
    if date_only:
        agrees = -TIME_AGREEMENT_S <= delta_s < SECONDS_PER_DAY + TIME_AGREEMENT_S
    else:
        agrees = abs(delta_s) <= TIME_AGREEMENT_S
    if not agrees:
        raise ImageError(
            path,
            f"DATE-OBS '{str(date_obs).strip()}' and MJD-OBS {mjd} disagree "
            f"by {abs(delta_s):.1f} s (more than {TIME_AGREEMENT_S:g} s)",
        )
    return from_mjd

"""IAU-style source identifiers ``JHHMMSS+DDMMSS`` from J2000 positions in degrees.

Format
    ``<prefix>HHMMSS<sign>DDMMSS``: right ascension in hours, minutes and seconds of time, and
    declination in degrees, arcminutes and arcseconds, two digits per field, always with an explicit
    sign (``+`` or ``-``) before the declination.

Rounding (deterministic, defined on integers: scalar and vectorized versions agree exactly)
    * RA: ``ra_deg`` is first wrapped into [0, 360). The total number of seconds of time is
      ``t = ra_deg * 240`` (24 h = 360 deg, so 1 deg = 240 s) and is rounded half-up to an integer
      ``T``. ``T`` is taken modulo 86 400, so 23h59m59.5s and RA = 359.99999 deg become ``000000``.
    * Dec: the magnitude ``|dec_deg| * 3600`` arcsec is rounded half-up to an integer ``A`` and
      capped at 324 000 (90 deg). The sign comes from the unrounded value: a declination that is
      negative but rounds to zero keeps ``-`` (``dec = -0.0001`` deg -> ``-000000``), so a source
      just south of the equator is never labelled as north of it. ``-0.0`` counts as negative (sign
      bit), so that the position decoded from a ``-000000`` name formats back to the same name.
    * Fields are then obtained by integer division (``HH = T // 3600``, ``MM = T // 60 % 60``,
      ``SS = T % 60``), so a field can never read "60": rounding up 59.5 s carries into the minutes,
      hours (and the 24 h wrap) or degrees automatically.
    * "Half-up" is decided on the fractional part computed exactly (``x - floor(x)`` is exact in
      binary floating point for the magnitudes involved), not with ``floor(x + 0.5)``, whose
      addition can round 0.49999999999999994 up to 1.

    The IAU naming recommendation truncates coordinates instead of rounding; this project rounds to
    the nearest unit instead (it keeps the name closest to the catalogued position, and every
    module that names sources uses this one function). Use :func:`parse_iau_source_id` to get back
    the position a name encodes.

Why the seed's example was wrong
    The seed system formatted ``RA = 120 deg`` as ``J120000``: it treated degrees as hours. The
    correct identifier of ``RA = 120 deg, Dec = +45 deg`` is ``J080000+450000`` (120 / 15 = 8 h).
    It also rounded seconds independently of the minutes, which produced fields such as "60".
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

SECONDS_PER_DAY = 86_400  # seconds of time in 24 h of right ascension
TIME_SECONDS_PER_DEG = 240.0  # 86 400 s / 360 deg
ARCSEC_PER_DEG = 3600.0
MAX_DEC_ARCSEC = 90 * 3600


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """Round non-negative floats to the nearest integer, ties upward, returned as int64.

    The fractional part ``x - floor(x)`` is exact in floating point (Sterbenz lemma for the
    magnitudes used here), so ties are decided on the true value of ``x``.
    """
    floor = np.floor(x)
    return (floor + (x - floor >= 0.5)).astype(np.int64)


def _validate_finite(ra_deg: np.ndarray, dec_deg: np.ndarray) -> None:
    """Reject NaN and infinite coordinates: no identifier can describe them."""
    if not (np.isfinite(ra_deg).all() and np.isfinite(dec_deg).all()):
        raise ValueError("source coordinates must be finite (got NaN or infinity)")


def ra_time_seconds(ra_deg: ArrayLike) -> np.ndarray:
    """Right ascension as integer seconds of time in [0, 86 400), rounded half-up.

    ``T = round_half_up((ra_deg mod 360) * 240) mod 86 400`` (1 deg = 240 s of time).
    """
    ra_wrapped_deg = np.mod(np.asarray(ra_deg, dtype=np.float64), 360.0)
    return np.mod(_round_half_up(ra_wrapped_deg * TIME_SECONDS_PER_DEG), SECONDS_PER_DAY)


def dec_arcsec_and_sign(dec_deg: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Declination magnitude as integer arcsec (rounded half-up, capped at 90 deg) and sign.

    Returns ``(abs_arcsec, is_negative)``; the sign is taken before rounding so that small negative
    declinations keep their ``-`` sign.
    """
    dec = np.asarray(dec_deg, dtype=np.float64)
    abs_arcsec = np.minimum(_round_half_up(np.abs(dec) * ARCSEC_PER_DEG), MAX_DEC_ARCSEC)
    return abs_arcsec, np.signbit(dec)


def iau_source_id(ra_deg: float, dec_deg: float, prefix: str = "J") -> str:
    """Identifier ``JHHMMSS+DDMMSS`` of one position (degrees, J2000); see the module docstring.

    >>> iau_source_id(120.0, 45.0)
    'J080000+450000'
    """
    ra = np.float64(ra_deg)
    dec = np.float64(dec_deg)
    _validate_finite(ra, dec)
    total_s = int(ra_time_seconds(ra))
    abs_arcsec, negative = dec_arcsec_and_sign(dec)
    total_as = int(abs_arcsec)
    sign = "-" if bool(negative) else "+"
    return (
        f"{prefix}{total_s // 3600:02d}{total_s // 60 % 60:02d}{total_s % 60:02d}"
        f"{sign}{total_as // 3600:02d}{total_as // 60 % 60:02d}{total_as % 60:02d}"
    )


def _ascii_fields(total: np.ndarray) -> np.ndarray:
    """(N, 6) ASCII digit codes ``AABBCC`` of ``total // 3600``, ``// 60 % 60`` and ``% 60``.

    Building the characters as uint8 codes keeps formatting vectorized (no per-element str()).
    """
    total = total.astype(np.int32)  # < 324 001; int32 division is markedly faster than int64
    fields = np.stack([total // 3600, total // 60 % 60, total % 60], axis=-1)  # each 0..99
    digits = np.stack([fields // 10, fields % 10], axis=-1).reshape(len(total), 6)
    return (digits + ord("0")).astype(np.uint8)


def iau_source_ids(ra_deg: ArrayLike, dec_deg: ArrayLike, prefix: str = "J") -> np.ndarray:
    """Vectorized :func:`iau_source_id`: identifiers for arrays of positions (degrees).

    Returns a 1-D object array of Python ``str`` (object dtype so that pandas and SQL drivers see
    ordinary strings); scalar or N-D inputs are flattened after broadcasting. Identical to calling
    :func:`iau_source_id` element by element.
    """
    ra, dec = np.broadcast_arrays(
        np.asarray(ra_deg, dtype=np.float64), np.asarray(dec_deg, dtype=np.float64)
    )
    ra, dec = ra.ravel(), dec.ravel()
    _validate_finite(ra, dec)
    abs_arcsec, negative = dec_arcsec_and_sign(dec)
    sign = np.where(negative, ord("-"), ord("+")).astype(np.uint8)[:, np.newaxis]
    codes = np.hstack([_ascii_fields(ra_time_seconds(ra)), sign, _ascii_fields(abs_arcsec)])
    body = np.ascontiguousarray(codes).view("S13").ravel().astype(np.str_)
    return np.strings.add(prefix, body).astype(object)


def parse_iau_source_id(source_id: str) -> tuple[float, float]:
    """Position (ra_deg, dec_deg) encoded by an identifier such as ``J080000+450000``.

    Inverse of :func:`iau_source_id` up to the rounding: the result is within 0.5 s of time in RA
    and 0.5 arcsec in Dec of the original position, and formats back to the same identifier.
    Raises ValueError when the string does not have the ``<prefix>HHMMSS±DDMMSS`` form.
    """
    sign_pos = max(source_id.rfind("+"), source_id.rfind("-"))
    ra_part, dec_part = source_id[sign_pos - 6 : sign_pos], source_id[sign_pos + 1 :]
    if sign_pos < 6 or not (ra_part.isdigit() and dec_part.isdigit() and len(dec_part) == 6):
        raise ValueError(f"not an identifier of the form JHHMMSS+DDMMSS: {source_id!r}")
    hh, mm, ss = int(ra_part[:2]), int(ra_part[2:4]), int(ra_part[4:])
    dd, dm, ds = int(dec_part[:2]), int(dec_part[2:4]), int(dec_part[4:])
    total_as = dd * 3600 + dm * 60 + ds
    if hh >= 24 or max(mm, ss, dm, ds) >= 60 or total_as > MAX_DEC_ARCSEC:
        raise ValueError(f"identifier fields out of range: {source_id!r}")
    ra_deg = (hh * 3600 + mm * 60 + ss) / TIME_SECONDS_PER_DEG
    dec_deg = total_as / ARCSEC_PER_DEG
    return ra_deg, -dec_deg if source_id[sign_pos] == "-" else dec_deg

"""Value-level helpers for catalogs: one-line row problems, numbers, sexagesimal angles, frames.

Pure functions on pandas Series and numpy arrays, used by :mod:`ese_assets.core.catalog_columns`
(column conventions) and :mod:`ese_assets.core.catalog_readers` (frame declarations). Every
problem raises :class:`CatalogProblem` whose text is one line without the file name; rows are
1-based data rows (1 = the first row after the header), as a person counts them in the file.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

#: Rows quoted in an error message; the count of all bad rows is always given.
MAX_ROWS_QUOTED = 3
#: The FITS standard: without RADESYS, EQUINOX < 1984 means FK4, otherwise FK5.
FITS_FK4_BEFORE = 1984.0
_DEG_UNITS = {"deg", "degree", "degrees", "d"}
_RAD_UNITS = {"rad", "radian", "radians"}
_HOUR_UNITS = {"h", "hr", "hour", "hours", "hourangle", "hms", "h:m:s"}
_DMS_UNITS = {"d:m:s", "dms"}
INTEGER_TEXT = re.compile(r"^[+-]?\d+$")
_BLANKS = ("", "nan", "null", "none", "--", "n/a", "na")
_SEPARATORS = r"[hdms\u00b0'\"\u2032\u2033:]"
_SEXAGESIMAL = re.compile(
    r"^([+\-\u2212]?)\s*(\d+(?:\.\d*)?)(?:\s+(\d+(?:\.\d*)?))?"
    r"(?:\s+(\d+(?:\.\d*)?))?\s*$"
)


class CatalogProblem(ValueError):
    """Why a table cannot be used as a catalog (one line, without the file name)."""


# --------------------------------------------------------------------------------------------------
# Row-level problems
# --------------------------------------------------------------------------------------------------


def rows_problem(
    column: str, bad: np.ndarray, raw: pd.Series, what: str, *, show_values: bool = True
) -> CatalogProblem:
    """``column 'DEC' row 17: -95.0 is outside [-90, 90]`` (a few rows quoted, all counted).

    Rows are 1-based data rows (1 = the first row after the header).
    """
    rows = np.flatnonzero(bad)
    quoted = rows[:MAX_ROWS_QUOTED]
    values = ", ".join(_show(raw.iloc[i]) for i in quoted) if show_values else ""
    if len(rows) == 1:
        return CatalogProblem(
            f"column '{column}' row {rows[0] + 1}: {values + ' ' if values else ''}{what}"
        )
    numbers = ", ".join(str(i + 1) for i in quoted)
    more = f" and {len(rows) - len(quoted)} more" if len(rows) > len(quoted) else ""
    values = f"{values}{', ...' if more else ''}; each " if values else ""
    return CatalogProblem(
        f"column '{column}' rows {numbers}{more} ({len(rows)} rows): {values}{what}"
    )


def _show(value) -> str:
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def column_text(raw: pd.Series) -> pd.Series:
    """Stripped text of a column, missing values as '' (readers have decoded bytes already)."""
    return raw.astype("string").str.strip().fillna("")


def blank_mask(text: pd.Series) -> np.ndarray:
    return text.str.lower().isin(_BLANKS).to_numpy(dtype=bool)


def numeric_column(column: str, raw: pd.Series) -> np.ndarray:
    """Float values of a column; blank cells are NaN, text that is not a number is an error."""
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise CatalogProblem(f"column '{column}' holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(raw.dtype):
        return raw.to_numpy(dtype=np.float64, na_value=np.nan)
    text = column_text(raw)
    values = pd.to_numeric(text.where(~blank_mask(text), None), errors="coerce")
    values = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(values) & ~blank_mask(text)
    if bad.any():
        raise rows_problem(column, bad, raw, "is not a number")
    return values


def require_finite(column: str, values: np.ndarray, raw: pd.Series) -> None:
    missing = np.isnan(values)
    if missing.any():
        raise rows_problem(
            column, missing, raw, "empty or NaN, but a position is required", show_values=False
        )
    infinite = ~np.isfinite(values)
    if infinite.any():
        raise rows_problem(column, infinite, raw, "is not finite")


# --------------------------------------------------------------------------------------------------
# Angles and frames
# --------------------------------------------------------------------------------------------------


def sexagesimal_fields(text: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(negative, A, B, C) of each value ``[+-]A[ :hd]B[ :m]C[s]``; NaN where a field is absent,
    A is NaN where the value is malformed.

    Separators (``: h d m s ° ' "``) become spaces and pandas' C parser reads the fields (about
    1 s per million values); values it cannot read send the column through a regular expression
    instead, which also marks the malformed ones.
    """
    normalised = text.str.replace(_SEPARATORS, " ", regex=True)
    negative = text.str.startswith(("-", "\u2212")).to_numpy(dtype=bool)
    try:
        fields = pd.read_csv(
            io.StringIO("\n".join(normalised.tolist())),
            sep=r"\s+",
            header=None,
            names=[0, 1, 2],
            dtype=np.float64,
            skip_blank_lines=False,
        )
        if len(fields) != len(text):
            raise ValueError("row count changed")
        a, b, c = (fields[i].to_numpy(dtype=np.float64) for i in range(3))
        return negative, np.abs(a), b, c
    except (ValueError, pd.errors.ParserError):
        parts = normalised.str.extract(_SEXAGESIMAL)
        a, b, c = (
            pd.to_numeric(parts[i], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            for i in (1, 2, 3)
        )
        return negative, a, b, c


def parse_sexagesimal(
    column: str, raw: pd.Series, *, hours: bool, fields: tuple | None = None
) -> np.ndarray:
    """Angles in degrees from sexagesimal text (``[+-]A[ :hd]B[ :m]C[s]``), vectorized.

    ``value = sign * (A + B/60 + C/3600)``, times 15 when ``hours``; the sign applies to the whole
    angle. B and C must be in [0, 60), A must be an integer when B is given and B when C is given;
    hours must be < 24. ``fields`` are :func:`sexagesimal_fields` of the column when known.
    """
    text = column_text(raw)
    blank = blank_mask(text)
    negative, a, b, c = sexagesimal_fields(text) if fields is None else fields
    has_b, has_c = ~np.isnan(b), ~np.isnan(c)
    malformed = ~blank & (np.isnan(a) | ~has_b)
    malformed |= has_b & ((a != np.floor(a)) | (b < 0)) | has_c & ((b != np.floor(b)) | (c < 0))
    if malformed.any():
        raise rows_problem(
            column,
            malformed,
            raw,
            "is not a sexagesimal angle ('12 34 56.7', '12:34:56.7', '-00:30:00')",
        )
    over = (np.nan_to_num(b) >= 60) | (np.nan_to_num(c) >= 60)
    if over.any():
        raise rows_problem(column, over, raw, "has minutes or seconds >= 60")
    if hours:
        over = a >= 24
        if over.any():
            raise rows_problem(column, over, raw, "is outside [0, 24) hours")
    magnitude = a + np.nan_to_num(b) / 60.0 + np.nan_to_num(c) / 3600.0
    degrees = np.where(negative, -magnitude, magnitude) * (15.0 if hours else 1.0)
    degrees[blank] = np.nan
    return degrees


def angle_column(
    column: str, raw: pd.Series, unit: str | None, *, is_ra: bool
) -> tuple[np.ndarray, str]:
    """Degrees from a position column, and a short description of how it was read."""
    unit_key = (unit or "").strip().lower()
    fields = None
    if not pd.api.types.is_numeric_dtype(raw.dtype):
        fields = sexagesimal_fields(column_text(raw))
    # A text column is sexagesimal when any value has two or more fields ("12 34", "1:2:3").
    if fields is None or not (~np.isnan(fields[2])).any():
        values = numeric_column(column, raw)
        if unit_key in _RAD_UNITS:
            return np.degrees(values), "radians"
        if unit_key in _HOUR_UNITS and is_ra:
            return values * 15.0, "hours"
        if unit_key and unit_key not in _DEG_UNITS:
            raise CatalogProblem(
                f"column '{column}' has unit '{unit}', not an angle unit (deg, rad, hourangle)"
            )
        return values, "degrees"
    hours = is_ra and unit_key not in _DMS_UNITS and unit_key not in _DEG_UNITS
    what = "sexagesimal hours" if hours else "sexagesimal degrees"
    return parse_sexagesimal(column, raw, hours=hours, fields=fields), what


def wrap_ra(column: str, ra_deg: np.ndarray, raw: pd.Series) -> np.ndarray:
    """RA in [-360, 0) wrapped into [0, 360); anything else outside [0, 360) is an error."""
    wrapped = np.where(ra_deg < 0, ra_deg + 360.0, ra_deg)
    wrapped[(ra_deg < 0) & (wrapped == 360.0)] = 0.0  # -1e-20 + 360 rounds to 360.0
    bad = (wrapped < 0) | (wrapped >= 360.0)
    if bad.any():
        raise rows_problem(column, bad, raw, "is outside [0, 360) deg (RA in [-360, 0) is wrapped)")
    return wrapped


def to_icrs(frame: str, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ICRS. FK5 J2000 is taken as ICRS (~20 mas apart); FK4 and FK5 at other
    equinoxes go through astropy's transformations."""
    system, _, equinox = frame.partition(" ")
    if system == "icrs":
        return ra_deg, dec_deg
    if system not in ("fk4", "fk5"):
        raise CatalogProblem(
            f"positions are in the '{frame}' frame; only ICRS, FK5 and FK4 "
            f"(B1950) RA/Dec are supported"
        )
    from astropy import units as u
    from astropy.coordinates import FK4, FK5, SkyCoord
    from astropy.time import Time

    try:
        epoch = Time(equinox or ("B1950" if system == "fk4" else "J2000"))
    except ValueError:
        raise CatalogProblem(f"cannot understand the equinox {equinox!r} of {system}") from None
    if system == "fk5" and abs(epoch.jyear - 2000.0) < 1e-6:
        return ra_deg, dec_deg
    frame_class = FK4 if system == "fk4" else FK5
    coords = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame=frame_class(equinox=epoch))
    icrs = coords.icrs
    return np.mod(icrs.ra.deg, 360.0), icrs.dec.deg


def frame_name(system: str | None, equinox=None) -> str | None:
    """Normalised frame: ``"icrs"``, ``"fk5 J2000"``, ``"fk4 B1950"``, or the system in lower case.

    ``system`` is a FITS ``RADESYS`` or VOTable ``COOSYS`` value (``ICRS``, ``FK5``, ``eq_FK4``...);
    ``equinox`` a number or text such as ``B1950.000``; missing parts take the FK4/FK5 defaults.
    """
    if system is None and equinox is None:
        return None
    key = (system or "").strip().lower().removeprefix("eq_")
    year = _equinox_year(equinox)
    if not key:
        if year is None:
            return None
        key = "fk4" if year < FITS_FK4_BEFORE else "fk5"
    if key == "icrs":
        return "icrs"
    if key == "fk4":
        return f"fk4 B{year if year is not None else 1950:g}"
    if key == "fk5":
        return f"fk5 J{year if year is not None else 2000:g}"
    return key


def _equinox_year(equinox) -> float | None:
    if equinox is None:
        return None
    text = str(equinox).strip().upper().lstrip("BJ").strip()
    try:
        return float(text)
    except ValueError:
        return None

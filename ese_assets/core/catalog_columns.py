"""Catalog column conventions: which columns hold RA, Dec, flux and name, in which unit and frame.

:func:`interpret_table` turns a :class:`RawTable` (a DataFrame plus the units and coordinate
frames its file declares, see :mod:`ese_assets.core.catalog_readers`) into validated arrays. Every
problem raises :class:`CatalogProblem` with a one-line reason; the caller adds the file name.

Column names
    Matched case-insensitively after removing a ``col_`` prefix (Selavy VOTable field IDs) and a
    unit written in the name (``Peak_flux [Jy/beam]``, ``Total_flux (mJy)``, ``flux_jy``,
    ``S_mJy``, ``ra_deg``). Positions come from the first RA/Dec pair of :data:`POSITION_PAIRS`
    that is present: VizieR's computed ``_RAJ2000/_DEJ2000`` (always decimal degrees), then
    ``RAJ2000/DEJ2000`` (NVSS, FIRST in VizieR; often sexagesimal), ``RA_ICRS/DE_ICRS``, Selavy
    ``ra_deg_cont/dec_deg_cont``, the generic ``RA/DEC`` (PyBDSF, FIRST, Aegean), the sexagesimal
    ``ra_hms_cont``/``ra_str`` and, last, B1950 columns (``RAB1950``...).

Units
    A unit declared by the file (FITS ``TUNIT``, VOTable/ECSV ``unit``, VizieR TSV unit row) wins;
    then a unit in the column name; then the writer's convention for that column name; then the
    project default (mJy for fluxes, degrees for numeric positions). A unit in the name that
    contradicts the declared one is an error. Writer conventions (checked against each writer):

    ========================  =====================  ======================================
    writer                    columns                unit when none is given
    ========================  =====================  ======================================
    PyBDSF                    Total_flux, Peak_flux  Jy, Jy/beam (``bdsf/gaul2srl.py``)
    Aegean                    int_flux, peak_flux    Jy, Jy/beam (``AegeanTools/models.py``)
    Selavy (ASKAP)            flux_int, flux_peak    mJy, mJy/beam (Selavy VOTables)
    NVSS (VizieR VIII/65)     S1.4                   mJy
    FIRST (VizieR VIII/92)    Fint, Fpeak            mJy, mJy/beam
    RACS-low (Hale+ 2021)     Total_flux_Source,     mJy, mJy/beam (a PyBDSF catalogue
                              Peak_flux              re-scaled to mJy)
    ========================  =====================  ======================================

    RACS and PyBDSF share ``Peak_flux``/``Total_flux``: a table is taken as RACS when it has one
    of RACS's own columns (``Total_flux_Source``, ``Total_flux_Gaussian``, ``Tile_ID``); otherwise
    these two columns follow PyBDSF (Jy). Flux per beam counts as flux (a point source's peak
    brightness in Jy/beam equals its flux density in Jy). Jy, mJy, uJy (also µJy, nJy, kJy) are
    understood.

Which flux
    Peak flux is preferred over integrated flux when both exist: forced photometry measures the
    peak brightness (Jy/beam) at the catalog position, so a catalog peak is the comparable number.
    Order: peak columns, then generic columns (``flux``, ``S1.4``, ``S``), then integrated columns.

Positions
    Numeric columns are degrees unless declared ``rad`` or hours (``h``, ``hourangle``).
    Text columns are sexagesimal (``12 34 56.7``, ``12:34:56.7``, ``12h34m56.7s``, ``+12 34 56``,
    ``-00:30:00``): RA in hours (unless declared ``d:m:s`` or degrees), Dec in degrees; the sign
    applies to the whole angle, so ``-00 30 00`` is -0.5 deg. RA in [-360, 0) is wrapped by +360.
    Frames: J2000-named columns are FK5 J2000, taken as ICRS (they differ by ~20 mas); generic
    columns follow the frame the file declares (FITS ``RADESYS``/``EQUINOX``, VOTable ``COOSYS``,
    PyBDSF's ``# Equinox`` line), ICRS when none; FK4/B1950 positions are transformed to ICRS with
    astropy; any other frame is refused.

Names
    A name column (``name``, ``Source_Name``, ``component_name``, ``NVSS``, ``FIRST``...) is used as
    written unless the file stores it as a number. An identifier column (``source_id``, ``id``,
    ``component_id``, ``uuid``, ``island_id``...) is used only when it holds text that is not a
    plain integer: PyBDSF's integer ``Source_id`` is a row index, not a name. Missing or empty names
    become IAU names of the positions (:mod:`ese_assets.core.source_ids`). Duplicates are errors.

Impossible values (errors, with 1-based data-row numbers: 1 is the first row after the header)
    missing, non-numeric or non-finite positions; |Dec| > 90; RA outside [-360, 360) deg or
    sexagesimal fields >= 60 or hours >= 24; fluxes that are non-finite, <= 0 or above
    :data:`MAX_FLUX_MJY`. A reference catalog lists detected sources, so a flux <= 0 is a sentinel
    or an error, never a measurement: an unknown flux must be an empty cell (kept as NaN).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ese_assets.core.catalog_values import (
    INTEGER_TEXT,
    MAX_ROWS_QUOTED,
    CatalogProblem,
    angle_column,
    column_text,
    numeric_column,
    require_finite,
    rows_problem,
    to_icrs,
    wrap_ra,
)
from ese_assets.core.source_ids import iau_source_ids

#: Brightest plausible catalog flux density: 1e6 Jy, far above any compact radio source.
MAX_FLUX_MJY = 1e9
MAX_COLUMNS_LISTED = 25

#: (RA alias, Dec alias, frame): ``None`` means the frame the file declares (default ICRS).
POSITION_PAIRS = (
    ("_raj2000", "_dej2000", "fk5"),
    ("raj2000", "dej2000", "fk5"),
    ("ra_j2000", "dec_j2000", "fk5"),
    ("ra_icrs", "de_icrs", "icrs"),
    ("ra_icrs", "dec_icrs", "icrs"),
    ("ra_deg_cont", "dec_deg_cont", "fk5"),
    ("ra", "dec", None),
    ("ra", "de", None),
    ("ra_hms_cont", "dec_dms_cont", "fk5"),
    ("ra_str", "dec_str", None),
    ("_rab1950", "_deb1950", "fk4"),
    ("rab1950", "deb1950", "fk4"),
    ("ra_b1950", "dec_b1950", "fk4"),
    ("ra1950", "dec1950", "fk4"),
)
RA_ALIASES = tuple(dict.fromkeys(ra for ra, _, _ in POSITION_PAIRS))
DEC_ALIASES = tuple(dict.fromkeys(dec for _, dec, _ in POSITION_PAIRS))

#: Flux columns in order of preference (peak first), with the writer's unit when none is given.
#: ``None`` = the project default (mJy); "pybdsf_or_racs" is decided per table (module docstring).
PYBDSF_OR_RACS = "pybdsf_or_racs"
FLUX_COLUMNS = (
    ("peak_flux", PYBDSF_OR_RACS),  # PyBDSF, Aegean (Jy/beam); RACS (mJy/beam)
    ("flux_peak", "mJy"),  # Selavy
    ("fpeak", "mJy"),  # FIRST
    ("s_peak", None),
    ("speak", None),
    ("flux", None),  # this project's own catalogs (flux_mjy)
    ("nvss_flux", None),
    ("s1.4", "mJy"),  # NVSS
    ("s", None),
    ("total_flux", PYBDSF_OR_RACS),  # PyBDSF (Jy); RACS (mJy)
    ("total_flux_source", "mJy"),  # RACS-low
    ("int_flux", "Jy"),  # Aegean
    ("flux_int", "mJy"),  # Selavy
    ("fint", "mJy"),  # FIRST
    ("s_int", None),
    ("sint", None),
)
FLUX_ALIASES = tuple(alias for alias, _ in FLUX_COLUMNS)
RACS_SIGNATURE = ("total_flux_source", "total_flux_gaussian", "tile_id")
PYBDSF_PEAK_TOTAL_UNIT = "Jy"
RACS_PEAK_TOTAL_UNIT = "mJy"

#: Name columns: used as written. Identifier columns: used only for non-integer text.
NAME_COLUMNS = (
    "name",
    "source_name",
    "component_name",
    "island_name",
    "nvss",
    "first",
    "iau_name",
    "designation",
)
#: Aegean's integer ``island``/``source`` are left out: they are indices, and a column named
#: "source" in a merged catalog often holds the survey of origin (the same text on every row).
ID_COLUMNS = ("source_id", "id", "component_id", "uuid", "island_id")
NAME_ALIASES = NAME_COLUMNS + ID_COLUMNS

_FLUX_UNIT_MJY = {
    "jy": 1e3,
    "mjy": 1.0,
    "ujy": 1e-3,
    "µjy": 1e-3,
    "μjy": 1e-3,
    "microjy": 1e-3,
    "njy": 1e-6,
    "kjy": 1e6,
    "millijy": 1.0,
}
_PER_BEAM = re.compile(r"(/beam|/bm|/psf|\.?beam\^?-1|\.?bm\^?-1|/beam_area|perbeam)$")
_NAME_UNIT_SUFFIX = re.compile(
    r"^(?P<base>.+?)_(?P<unit>jy|mjy|ujy|µjy|njy|deg|rad|hours?)$", re.IGNORECASE
)
_BRACKET_UNIT = re.compile(r"^(?P<base>.*?)\s*[\[(](?P<unit>[^\])]*)[\])]\s*$")


@dataclass
class RawTable:
    """A table as read from a file, before interpretation.

    ``units`` and ``frames`` map column names (as in ``data``) to the unit string and coordinate
    frame (``"icrs"``, ``"fk5 J2000"``, ``"fk4 B1950"``, or any other system name) the file
    declares for that column; ``file_frame`` is a frame declared for the whole file.
    """

    data: pd.DataFrame
    units: dict[str, str] = field(default_factory=dict)
    frames: dict[str, str] = field(default_factory=dict)
    file_frame: str | None = None


@dataclass(frozen=True)
class CatalogColumns:
    """Validated sources: names, ICRS degrees, mJy (NaN = unknown), and what was read from where."""

    source_id: np.ndarray
    ra_deg: np.ndarray
    dec_deg: np.ndarray
    flux_mjy: np.ndarray
    description: str


# --------------------------------------------------------------------------------------------------
# Column names and units
# --------------------------------------------------------------------------------------------------


def _clean_unit(unit) -> str | None:
    """Unit text as declared, without quotes (VizieR writes ``"h:m:s"``); None when blank."""
    if unit is None:
        return None
    text = str(unit).strip().strip('"').strip()
    return text or None


def split_column_name(column) -> tuple[str, str | None]:
    """(lower-case key, unit written in the name or None): ``'Peak_flux [Jy/beam]'`` ->
    ``('peak_flux', 'Jy/beam')``, ``'S_mJy'`` -> ``('s', 'mJy')``, ``'col_ra'`` -> ``('ra', None)``.
    """
    text = str(column).strip()
    unit = None
    bracket = _BRACKET_UNIT.match(text)
    if bracket and bracket.group("base"):
        text, unit = bracket.group("base"), _clean_unit(bracket.group("unit"))
    if text.lower().startswith("col_") and len(text) > 4:
        text = text[4:]
    if unit is None:
        suffix = _NAME_UNIT_SUFFIX.match(text)
        if suffix:
            text, unit = suffix.group("base"), suffix.group("unit")
    return text.lower(), unit


def _column_index(columns) -> dict[str, str]:
    """Alias key -> real column name; the full lower-case name and the unit-stripped key both
    count, and the first column claiming a key keeps it."""
    index: dict[str, str] = {}
    for column in columns:
        full = str(column).strip().lower()
        index.setdefault(full, column)
        if full.startswith("col_"):
            index.setdefault(full[4:], column)
        index.setdefault(split_column_name(column)[0], column)
    return index


def find_column(columns, aliases: tuple[str, ...]) -> str | None:
    """The first alias present among ``columns`` (see :func:`split_column_name`); its real name."""
    index = _column_index(columns)
    return next((index[alias] for alias in aliases if alias in index), None)


def flux_scale_to_mjy(unit: str) -> float | None:
    """Factor converting a flux density in ``unit`` to mJy (per-beam units count as flux);
    None when ``unit`` is not a flux density."""
    text = unit.strip().strip('"').lower().replace(" ", "")
    text = _PER_BEAM.sub("", text)
    if text in _FLUX_UNIT_MJY:
        return _FLUX_UNIT_MJY[text]
    from astropy import units as u  # rarer spellings ("10-3 Jy", "W m-2 Hz-1")

    try:
        parsed = u.Unit(unit.strip().strip('"'), parse_strict="silent")
        if isinstance(parsed, u.UnrecognizedUnit):
            return None
        if parsed.is_equivalent(u.mJy):
            return float(parsed.to(u.mJy))
        if (parsed * u.beam).is_equivalent(u.mJy):
            return float((parsed * u.beam).to(u.mJy))
    except (ValueError, TypeError):
        pass
    return None


def _declared_unit(table: RawTable, column: str) -> str | None:
    if column in table.units:
        return _clean_unit(table.units[column])
    lowered = {str(k).lower(): v for k, v in table.units.items()}
    return _clean_unit(lowered.get(str(column).lower()))


def _resolve_unit(table: RawTable, column: str, convention: str | None) -> tuple[str | None, str]:
    """(unit, where it came from): declared by the file, written in the name, or convention."""
    declared = _declared_unit(table, column)
    in_name = split_column_name(column)[1]
    if declared is not None and in_name is not None:
        declared_scale, name_scale = flux_scale_to_mjy(declared), flux_scale_to_mjy(in_name)
        if declared_scale is not None and name_scale is not None and declared_scale != name_scale:
            raise CatalogProblem(
                f"column '{column}' has unit {in_name} in its name but is declared in {declared}"
            )
    if declared is not None:
        return declared, "declared"
    if in_name is not None:
        return in_name, "column name"
    if convention is not None:
        return convention, "writer convention"
    return None, "default"


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


def _frame_of(table: RawTable, ra_col: str, pair_frame: str | None) -> str:
    """Normalised frame: "icrs", "fk5 J2000", "fk4 B1950", or the declared name when other."""
    if pair_frame == "icrs":
        return "icrs"
    if pair_frame == "fk5":
        return "fk5 J2000"
    if pair_frame == "fk4":
        return "fk4 B1950"
    declared = table.frames.get(ra_col) or table.file_frame
    return declared or "icrs"


def _positions(table: RawTable) -> tuple[np.ndarray, np.ndarray, str]:
    data = table.data
    index = _column_index(data.columns)
    pair = next(
        (
            (index[ra], index[dec], frame)
            for ra, dec, frame in POSITION_PAIRS
            if ra in index and dec in index
        ),
        None,
    )
    if pair is None:
        found = ", ".join(f"'{c}'" for c in list(map(str, data.columns))[:MAX_COLUMNS_LISTED])
        if len(data.columns) > MAX_COLUMNS_LISTED:
            found += f" and {len(data.columns) - MAX_COLUMNS_LISTED} more"
        if any(ra in index for ra in RA_ALIASES):
            raise CatalogProblem(
                f"missing Dec column to go with RA (one of "
                f"{', '.join(DEC_ALIASES[:8])}...; columns found: {found})"
            )
        raise CatalogProblem(
            f"missing RA column (one of {', '.join(RA_ALIASES[:8])}...; "
            f"columns found: {found or 'none'})"
        )
    ra_col, dec_col, pair_frame = pair
    ra_unit, _ = _resolve_unit(table, ra_col, None)
    dec_unit, _ = _resolve_unit(table, dec_col, None)
    ra_deg, ra_how = angle_column(str(ra_col), data[ra_col], ra_unit, is_ra=True)
    dec_deg, dec_how = angle_column(str(dec_col), data[dec_col], dec_unit, is_ra=False)
    require_finite(str(ra_col), ra_deg, data[ra_col])
    require_finite(str(dec_col), dec_deg, data[dec_col])
    ra_deg = wrap_ra(str(ra_col), ra_deg, data[ra_col])
    bad_dec = np.abs(dec_deg) > 90.0
    if bad_dec.any():
        raise rows_problem(str(dec_col), bad_dec, data[dec_col], "is outside [-90, 90]")
    frame = _frame_of(table, ra_col, pair_frame)
    ra_deg, dec_deg = to_icrs(frame, ra_deg, dec_deg)
    description = f"RA '{ra_col}' ({ra_how}), Dec '{dec_col}' ({dec_how}), frame {frame}"
    return ra_deg, dec_deg, description


# --------------------------------------------------------------------------------------------------
# Flux
# --------------------------------------------------------------------------------------------------


def _flux(table: RawTable) -> tuple[np.ndarray, str]:
    data = table.data
    index = _column_index(data.columns)
    choice = next(((index[alias], unit) for alias, unit in FLUX_COLUMNS if alias in index), None)
    if choice is None:
        return np.full(len(data), np.nan), "no flux column (fluxes unknown)"
    column, convention = choice
    if convention == PYBDSF_OR_RACS:
        racs = any(key in index for key in RACS_SIGNATURE)
        convention = RACS_PEAK_TOTAL_UNIT if racs else PYBDSF_PEAK_TOTAL_UNIT
    unit, source = _resolve_unit(table, column, convention)
    scale = 1.0 if unit is None else flux_scale_to_mjy(unit)
    if scale is None:
        raise CatalogProblem(
            f"column '{column}' has unit '{unit}', not a flux density "
            f"(Jy, mJy, uJy, optionally per beam)"
        )
    raw = data[column]
    values = numeric_column(str(column), raw)
    flux_mjy = values * scale
    checks = (
        (np.isinf(values), "is not finite"),
        (flux_mjy <= 0, "is not a positive flux density (leave the cell empty when unknown)"),
        (
            np.isfinite(flux_mjy) & (flux_mjy > MAX_FLUX_MJY),
            f"is above {MAX_FLUX_MJY / 1e3:.0e} Jy",
        ),
    )
    for bad, what in checks:
        if bad.any():
            raise rows_problem(str(column), bad, raw, f"{what} (column unit {unit or 'mJy'})")
    return flux_mjy, f"flux '{column}' in {unit or 'mJy'} ({source})"


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def name_candidates(columns) -> list[str]:
    """Columns that may hold names (readers keep them as text, e.g. leading zeros in "0042")."""
    index = _column_index(columns)
    return list(dict.fromkeys(index[alias] for alias in NAME_ALIASES if alias in index))


def _name_column(data: pd.DataFrame) -> tuple[str | None, str]:
    """The column to take names from, or None, with the reason other candidates were skipped."""
    index = _column_index(data.columns)
    skipped = []
    for alias in NAME_ALIASES:
        column = index.get(alias)
        if column is None or column in skipped:
            continue
        raw = data[column]
        if pd.api.types.is_numeric_dtype(raw.dtype):
            skipped.append(column)
            continue
        if alias in ID_COLUMNS:
            text = column_text(raw)
            filled = text[text != ""]
            if len(filled) and filled.str.fullmatch(INTEGER_TEXT.pattern).all():
                skipped.append(column)
                continue
        return column, ""
    note = f" ('{skipped[0]}' is a numeric index, not a name)" if skipped else ""
    return None, note


def _names(data: pd.DataFrame, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, str]:
    """Names from the name column, IAU names where absent or empty; duplicates are errors."""
    column, note = _name_column(data)
    if column is None:
        ids = iau_source_ids(ra_deg, dec_deg)
        description = f"IAU names from positions{note}"
    else:
        ids = column_text(data[column]).to_numpy(dtype=object, na_value="")
        empty = ids == ""
        if empty.any():  # only name the rows that need it (formatting 1e6 ids costs ~0.5 s)
            ids[empty] = iau_source_ids(ra_deg[empty], dec_deg[empty])
        description = f"names '{column}'"
    duplicated = pd.Series(ids).duplicated(keep=False).to_numpy()  # hashing: O(N), not a sort
    if duplicated.any():
        repeated = pd.unique(ids[duplicated])
        shown = []
        for name in repeated[:MAX_ROWS_QUOTED]:
            rows = np.flatnonzero(ids == name)[:MAX_ROWS_QUOTED] + 1
            shown.append(f"{name!r} in rows {', '.join(map(str, rows))}")
        where = f"column '{column}'" if column is not None else "IAU names made from positions"
        hint = "" if column is not None else " (sources closer than 1 arcsec need a name column)"
        count = f"{len(repeated)} name{'s' if len(repeated) > 1 else ''} repeated"
        raise CatalogProblem(
            f"duplicate source_id values in {where}: {'; '.join(shown)} ({count}){hint}"
        )
    return ids, description


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def interpret_table(table: RawTable) -> CatalogColumns:
    """Validated names, ICRS positions (deg) and fluxes (mJy) of a table (module docstring)."""
    if len(table.data) == 0:
        raise CatalogProblem("catalog is empty (a header but no rows)")
    ra_deg, dec_deg, where = _positions(table)
    flux_mjy, flux_how = _flux(table)
    source_id, names_how = _names(table.data, ra_deg, dec_deg)
    count = f"{len(ra_deg)} source{'s' if len(ra_deg) != 1 else ''}"
    return CatalogColumns(
        source_id=source_id,
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        flux_mjy=flux_mjy,
        description=f"{count}; {where}; {flux_how}; {names_how}",
    )

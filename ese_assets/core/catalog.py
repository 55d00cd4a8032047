"""Reference source catalogs (e.g. NVSS) and selection of the sources inside an image footprint.

Loading (:func:`load_catalog`)
    CSV/whitespace text, FITS tables and VOTables are read with pandas/astropy; SQLite files are
    read from their ``sources`` table with the standard-library ``sqlite3`` module (read-only, bound
    parameters). Columns are matched case-insensitively from the aliases in ``*_ALIASES`` (first
    alias present wins). Fluxes are in mJy; a flux column whose name ends in ``_jy``, or whose
    astropy unit is Jy, is converted from Jy. The name column and the flux column are optional: a
    missing or empty name becomes :func:`~ese_assets.core.source_ids.iau_source_id` of the
    position, a missing flux is NaN ("unknown"). Every problem raises :class:`CatalogError` naming
    the file and the problem.

Footprint selection (:meth:`Catalog.select_in_footprint`)
    1. A spatial index is built once per Catalog and cached on the instance: positions sorted by
       declination plus their unit vectors ``(cos d cos a, cos d sin a, sin d)``.
    2. Cone pre-filter around the image centre with radius ``r`` = centre-to-corner distance plus a
       pad: a declination band ``[dec_c - r, dec_c + r]`` found by binary search, then the exact
       cone test ``u . u_c >= cos r`` on unit vectors. Dot products have no RA wrap at 0/360 and
       no singularity at the poles, unlike RA/Dec boxes (a flaw of the seed system).
    3. Exact test on the survivors: ``wcs.world_to_pixel_values`` and the pixel rectangle
       ``[margin, n - 1 - margin]`` on both axes (0-based pixel centres).
    For a 3.5 deg image and a 1-million-source catalog step 2 touches a few per cent of the
    catalog and step 3 a few thousand sources, which takes milliseconds once the index exists.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.table import Table

from ese_assets.core.fits_image import image_center_and_radius
from ese_assets.core.source_ids import iau_source_ids

NAME_ALIASES = ("name", "source_id", "id", "source_name")
RA_ALIASES = ("ra", "ra_deg", "raj2000", "ra_j2000")
DEC_ALIASES = ("dec", "dec_deg", "dej2000", "dec_j2000")
FLUX_ALIASES = ("flux", "flux_mjy", "nvss_flux_mjy", "s1.4", "peak_flux", "flux_jy")

TEXT_SUFFIXES = (".csv", ".txt")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz")
VOTABLE_SUFFIXES = (".vot", ".xml", ".votable")
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
SQLITE_TABLE = "sources"

#: Cone pre-filter pad: absolute (deg) plus a fraction of the radius, so that rounding in the
#: corner distance or mild projection distortion can never drop a source the pixel test accepts.
CONE_PAD_DEG = 0.01
CONE_PAD_FRAC = 0.01


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Spatial index
# --------------------------------------------------------------------------------------------------

def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(N, 3) unit vectors ``(cos d cos a, cos d sin a, sin d)`` of positions in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cos_dec = np.cos(dec)
    return np.column_stack((cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)))


@dataclass(frozen=True)
class _SkyIndex:
    """Catalog positions sorted by declination, with unit vectors in the same order."""

    order: np.ndarray  # indices into the catalog, by increasing dec
    dec_sorted_deg: np.ndarray
    xyz_sorted: np.ndarray  # (N, 3)

    @classmethod
    def build(cls, ra_deg: np.ndarray, dec_deg: np.ndarray) -> _SkyIndex:
        order = np.argsort(dec_deg)  # ties in dec may come in any order
        return cls(order=order, dec_sorted_deg=dec_deg[order],
                   xyz_sorted=unit_vectors(ra_deg[order], dec_deg[order]))

    def cone(self, ra_deg: float, dec_deg: float, radius_deg: float) -> np.ndarray:
        """Catalog indices (unsorted) within ``radius_deg`` of (ra_deg, dec_deg)."""
        if radius_deg >= 180.0:
            return self.order.copy()
        # Declination band by binary search; near a pole it simply runs to the end of the array.
        lo = np.searchsorted(self.dec_sorted_deg, dec_deg - radius_deg, side="left")
        hi = np.searchsorted(self.dec_sorted_deg, dec_deg + radius_deg, side="right")
        centre = unit_vectors(np.array([ra_deg]), np.array([dec_deg]))[0]
        inside = self.xyz_sorted[lo:hi] @ centre >= math.cos(math.radians(radius_deg))
        return self.order[lo:hi][inside]


# --------------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Catalog:
    """Reference sources: ``source_id`` (str), ``ra_deg``/``dec_deg`` (deg), ``flux_mjy`` (mJy).

    The arrays are made read-only so that the cached spatial index can never go stale. Equality is
    identity (``eq=False``): comparing arrays element-wise is not a meaningful ``==``.
    """

    source_id: np.ndarray
    ra_deg: np.ndarray
    dec_deg: np.ndarray
    flux_mjy: np.ndarray
    path: str = ""

    def __post_init__(self) -> None:
        arrays = {
            "source_id": np.asarray(self.source_id, dtype=object),
            "ra_deg": np.asarray(self.ra_deg, dtype=np.float64),
            "dec_deg": np.asarray(self.dec_deg, dtype=np.float64),
            "flux_mjy": np.asarray(self.flux_mjy, dtype=np.float64),
        }
        lengths = {name: a.shape for name, a in arrays.items()}
        if len({shape for shape in lengths.values()}) != 1 or arrays["ra_deg"].ndim != 1:
            raise ValueError(f"Catalog arrays must be 1-D and of equal length, got {lengths}")
        for name, array in arrays.items():
            array = array.copy() if array is getattr(self, name) else array
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "_index_cache", None)

    def __reduce__(self):
        # Pickle the data only (e.g. for multiprocess executors); the index is rebuilt on demand.
        return (Catalog, (self.source_id, self.ra_deg, self.dec_deg, self.flux_mjy, self.path))

    def __len__(self) -> int:
        return len(self.ra_deg)

    def __repr__(self) -> str:
        return f"Catalog(path={self.path!r}, n_sources={len(self)})"

    def _index(self) -> _SkyIndex:
        """The spatial index, built on first use and cached on the instance.

        No lock: two threads racing here both build the same immutable index and one is kept.
        """
        if self._index_cache is None:
            object.__setattr__(self, "_index_cache", _SkyIndex.build(self.ra_deg, self.dec_deg))
        return self._index_cache

    def select_in_footprint(self, wcs, shape: tuple[int, int], *, min_flux_mjy: float = 0.0,
                            edge_margin_pix: float = 0.0) -> np.ndarray:
        """Sorted indices of sources inside the image and at least as bright as ``min_flux_mjy``.

        ``wcs`` is a celestial 2-D astropy WCS and ``shape`` is (ny, nx). A source is inside when
        its 0-based pixel position (x, y) satisfies ``margin <= x <= nx - 1 - margin`` and the same
        for y. Sources with unknown (NaN) flux are kept only when ``min_flux_mjy <= 0``.
        """
        ny, nx = shape
        if len(self) == 0 or nx - 1 - 2 * edge_margin_pix < 0 or ny - 1 - 2 * edge_margin_pix < 0:
            return np.empty(0, dtype=np.int64)
        ra_c, dec_c, radius = image_center_and_radius(wcs, shape)
        radius = radius * (1.0 + CONE_PAD_FRAC) + CONE_PAD_DEG
        idx = self._index().cone(ra_c, dec_c, radius)
        if min_flux_mjy > 0:
            idx = idx[self.flux_mjy[idx] >= min_flux_mjy]
        x, y = wcs.world_to_pixel_values(self.ra_deg[idx], self.dec_deg[idx])
        # NaN (positions that do not project) compare False and are dropped.
        inside = ((x >= edge_margin_pix) & (x <= nx - 1 - edge_margin_pix)
                  & (y >= edge_margin_pix) & (y <= ny - 1 - edge_margin_pix))
        return np.sort(idx[inside]).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Readers: each returns a DataFrame with the file's own column names (plus units when known)
# --------------------------------------------------------------------------------------------------

def _read_text(path: str) -> pd.DataFrame:
    """CSV (comma), tab-separated or whitespace-separated text with a header line.

    The name column is read as text so that names such as "0042" keep their leading zeros; the
    numeric columns are parsed by pandas' C parser (fast for million-row catalogs).
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    sep = "," if "," in first else "\t" if "\t" in first else r"\s+"
    header = pd.read_csv(path, sep=sep, nrows=0).columns
    name_col = find_column(header, NAME_ALIASES)
    return pd.read_csv(path, sep=sep, skipinitialspace=True,
                       dtype={name_col: str} if name_col is not None else None)


def _read_table(path: str, fmt: str) -> tuple[pd.DataFrame, dict[str, u.UnitBase]]:
    """FITS table or VOTable via astropy Table, plus the column units (keys lower-cased)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unit parsing and VOTable spec warnings are not errors
        table = Table.read(path, format=fmt)
    # Vector columns can be neither positions nor names, and pandas cannot hold them.
    names = [name for name in table.colnames if table[name].ndim == 1]
    units = {name.lower(): table[name].unit for name in names if table[name].unit is not None}
    return table[names].to_pandas(), units


def _quote_identifier(name: str) -> str:
    """SQL identifier quoting; names come from the file's own schema, values are always bound."""
    return '"' + name.replace('"', '""') + '"'


def _read_sqlite(path: str) -> pd.DataFrame:
    """All rows of the ``sources`` table of an SQLite file, opened read-only."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise CatalogError(path, f"cannot open SQLite file ({exc})") from None
    try:
        found = connection.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND lower(name) = ?",
            (SQLITE_TABLE,)).fetchone()
        if found is None:
            raise CatalogError(path, f"no '{SQLITE_TABLE}' table in SQLite file")
        cursor = connection.execute(f"SELECT * FROM {_quote_identifier(found[0])}")
        names = [d[0] for d in cursor.description]
        return pd.DataFrame.from_records(cursor.fetchall(), columns=names)
    except sqlite3.DatabaseError as exc:
        raise CatalogError(path, f"cannot read SQLite file ({exc})") from None
    finally:
        connection.close()


def _read_any(path: str) -> tuple[pd.DataFrame, dict[str, u.UnitBase]]:
    name = path.lower()
    try:
        if name.endswith(TEXT_SUFFIXES):
            return _read_text(path), {}
        if name.endswith(FITS_SUFFIXES):
            return _read_table(path, "fits")
        if name.endswith(VOTABLE_SUFFIXES):
            return _read_table(path, "votable")
        if name.endswith(SQLITE_SUFFIXES):
            return _read_sqlite(path), {}
    except CatalogError:
        raise
    except FileNotFoundError:
        raise CatalogError(path, "file not found") from None
    except pd.errors.EmptyDataError:
        raise CatalogError(path, "catalog is empty (no header or rows)") from None
    except Exception as exc:  # parser errors of pandas/astropy: report, do not guess
        raise CatalogError(path, f"cannot read catalog ({type(exc).__name__}: {exc})") from None
    raise CatalogError(path, "unknown catalog format (expected .csv/.txt, .fits/.fit/.fits.gz, "
                             ".vot/.xml/.votable or .sqlite/.sqlite3/.db)")


# --------------------------------------------------------------------------------------------------
# Column matching and validation
# --------------------------------------------------------------------------------------------------

def find_column(columns, aliases: tuple[str, ...]) -> str | None:
    """The first alias present among ``columns`` (case-insensitive, stripped); its real name."""
    by_lower = {}
    for column in columns:
        by_lower.setdefault(str(column).strip().lower(), column)
    return next((by_lower[alias] for alias in aliases if alias in by_lower), None)


def _numeric(path: str, frame: pd.DataFrame, column: str, *, required: bool) -> np.ndarray:
    """Float array of a column; empty cells are NaN (an error when ``required``)."""
    raw = frame[column]
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise CatalogError(path, f"non-numeric values in column '{column}' (booleans)")
    if pd.api.types.is_numeric_dtype(raw.dtype):  # already parsed: no text to inspect
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.zeros(len(values), dtype=bool)
    else:
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        text = raw.astype("string").str.strip().str.lower().fillna("")
        blank = text.isin(["", "nan", "null", "none"]).to_numpy(dtype=bool)
        bad = np.isnan(values) & ~blank
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CatalogError(path, f"non-numeric values in column '{column}' ({int(bad.sum())} rows, "
                                 f"e.g. {raw.iloc[row]!r} in row {row + 1})")
    missing = np.isnan(values) if required else np.zeros(len(values), dtype=bool)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise CatalogError(path, f"missing values in column '{column}' ({int(missing.sum())} rows, "
                                 f"first in row {row + 1})")
    return values


def _flux_scale_to_mjy(column: str, unit) -> float:
    """Factor converting a flux column to mJy: from its astropy unit if any, else from its name."""
    if unit is not None:
        try:
            return float(u.Unit(unit).to(u.mJy))
        except (u.UnitConversionError, ValueError, TypeError):
            pass  # e.g. "mJy/beam": fall back to the name rule
    return 1000.0 if column.strip().lower().endswith("_jy") else 1.0


def _wrap_ra(path: str, ra_deg: np.ndarray) -> np.ndarray:
    """RA wrapped from [-360, 0) into [0, 360); anything else outside [0, 360) is an error."""
    wrapped = np.where(ra_deg < 0, ra_deg + 360.0, ra_deg)
    wrapped[(ra_deg < 0) & (wrapped == 360.0)] = 0.0  # -1e-20 + 360 rounds to 360.0
    bad = (wrapped < 0) | (wrapped >= 360.0)
    if bad.any():
        raise CatalogError(path, f"RA outside [0, 360) deg in {int(bad.sum())} rows "
                                 f"(e.g. {ra_deg[bad][0]})")
    return wrapped


def _source_ids(path: str, frame: pd.DataFrame, name_col: str | None, ra_deg: np.ndarray,
                dec_deg: np.ndarray) -> np.ndarray:
    """Names from the name column, IAU identifiers where absent or empty; duplicates are errors."""
    if name_col is None:
        ids = iau_source_ids(ra_deg, dec_deg)
    else:
        names = frame[name_col].astype("string").str.strip().fillna("")
        ids = names.to_numpy(dtype=object, na_value="")
        empty = ids == ""
        if empty.any():  # only name the rows that need it (formatting 1e6 ids costs ~0.5 s)
            ids[empty] = iau_source_ids(ra_deg[empty], dec_deg[empty])
    duplicated = pd.Series(ids).duplicated(keep=False).to_numpy()  # hashing: O(N), not a sort
    if duplicated.any():
        dupes = pd.unique(ids[duplicated])
        raise CatalogError(path, f"duplicate source_id values ({len(dupes)} ids, e.g. "
                                 f"{', '.join(map(repr, dupes[:3]))})")
    return ids


def catalog_from_frame(path: str, frame: pd.DataFrame,
                       units: dict[str, u.UnitBase] | None = None) -> Catalog:
    """Validate a table of sources (any supported column names) and build a Catalog."""
    units = units or {}
    if len(frame) == 0:
        raise CatalogError(path, "catalog is empty")
    ra_col = find_column(frame.columns, RA_ALIASES)
    dec_col = find_column(frame.columns, DEC_ALIASES)
    for label, column, aliases in (("RA", ra_col, RA_ALIASES), ("Dec", dec_col, DEC_ALIASES)):
        if column is None:
            raise CatalogError(path, f"missing {label} column (one of {', '.join(aliases)}; "
                                     f"found {', '.join(map(str, frame.columns))})")
    ra_deg = _wrap_ra(path, _numeric(path, frame, ra_col, required=True))
    dec_deg = _numeric(path, frame, dec_col, required=True)
    bad_dec = np.abs(dec_deg) > 90.0
    if bad_dec.any():
        raise CatalogError(path, f"|Dec| > 90 deg in {int(bad_dec.sum())} rows "
                                 f"(e.g. {dec_deg[bad_dec][0]})")
    flux_col = find_column(frame.columns, FLUX_ALIASES)
    if flux_col is None:
        flux_mjy = np.full(len(frame), np.nan)
    else:
        scale = _flux_scale_to_mjy(str(flux_col), units.get(str(flux_col).lower()))
        flux_mjy = _numeric(path, frame, flux_col, required=False) * scale
    source_id = _source_ids(path, frame, find_column(frame.columns, NAME_ALIASES), ra_deg, dec_deg)
    return Catalog(source_id=source_id, ra_deg=ra_deg, dec_deg=dec_deg, flux_mjy=flux_mjy,
                   path=path)


def load_catalog(path: str | os.PathLike) -> Catalog:
    """Read and validate a catalog file (format from the suffix; see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CatalogError(path, "file not found")
    frame, units = _read_any(path)
    return catalog_from_frame(path, frame, units)


# --------------------------------------------------------------------------------------------------
# Per-process cache
# --------------------------------------------------------------------------------------------------

#: Entries kept; a changed file gets a new key, and old versions of the same path are evicted.
CACHE_MAX_ENTRIES = 4
_cache: dict[tuple[str, int, int], Catalog] = {}
_cache_lock = threading.Lock()


def load_catalog_cached(path: str | os.PathLike) -> Catalog:
    """:func:`load_catalog` memoised per process on (absolute path, mtime_ns, size).

    A rewritten file has a new mtime or size and is read again; the spatial index built by the
    first footprint selection is reused by every later call on the same file version.
    """
    abspath = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(abspath)
    except FileNotFoundError:
        raise CatalogError(os.fspath(path), "file not found") from None
    key = (abspath, stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    catalog = load_catalog(abspath)  # outside the lock: reading can take seconds
    with _cache_lock:
        for old in [k for k in _cache if k[0] == abspath]:  # superseded versions of this file
            del _cache[old]
        while len(_cache) >= CACHE_MAX_ENTRIES:  # dicts keep insertion order: drop the oldest
            del _cache[next(iter(_cache))]
        _cache[key] = catalog
    return catalog


def clear_catalog_cache() -> None:
    """Forget all cached catalogs (tests, or to release memory)."""
    with _cache_lock:
        _cache.clear()

"""Reference source catalogs (e.g. NVSS) and selection of the sources inside an image footprint.

Loading (:func:`load_catalog`, :func:`check_catalog`)
    A reader of :mod:`ese_assets.core.catalog_readers` (text, ECSV, FITS table, VOTable, SQLite
    ``sources`` table) returns the file's columns with the units and frames it declares; then
    :mod:`ese_assets.core.catalog_columns` applies the column, unit, frame and name conventions of
    the writers (PyBDSF, Aegean, Selavy, VizieR NVSS/FIRST, RACS) and rejects impossible values
    with their row numbers. The result is ICRS degrees, flux in mJy (NaN = unknown) and unique
    names. Every problem, from a missing file to a bad row, raises :class:`CatalogError` whose
    text is one line: ``<file>: <problem>``.

Footprint selection (:meth:`Catalog.select_in_footprint`)
    1. A spatial index is built once per Catalog and cached on the instance: positions sorted by
       declination plus their unit vectors ``(cos d cos a, cos d sin a, sin d)``.
    2. Cone pre-filter around the image centre with radius ``r`` = centre-to-corner distance plus a
       pad, both in ICRS whatever the image's frame: a declination band ``[dec_c - r, dec_c + r]``
       found by binary search, then the exact cone test ``u . u_c >= cos r`` on unit vectors. Dot
       products have no RA wrap at 0/360 and no singularity at the poles, unlike RA/Dec boxes (a
       flaw of the seed system).
    3. Exact test on the survivors: their ICRS positions are transformed into the image's frame
       (FK4, Galactic...; one vectorized astropy transform, none for ICRS images), sent through
       the WCS (either axis order) and tested against the pixel rectangle
       ``[margin, n - 1 - margin]`` on both axes (0-based pixel centres).
    For a 3.5 deg image and a 1-million-source catalog step 2 touches a few per cent of the
    catalog and step 3 a few thousand sources, which takes milliseconds once the index exists.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from ese_assets.core.catalog_columns import DEC_ALIASES as DEC_ALIASES  # re-exported names
from ese_assets.core.catalog_columns import FLUX_ALIASES as FLUX_ALIASES
from ese_assets.core.catalog_columns import NAME_ALIASES as NAME_ALIASES
from ese_assets.core.catalog_columns import RA_ALIASES as RA_ALIASES
from ese_assets.core.catalog_columns import CatalogColumns, RawTable, interpret_table
from ese_assets.core.catalog_columns import find_column as find_column
from ese_assets.core.catalog_readers import SQLITE_TABLE as SQLITE_TABLE
from ese_assets.core.catalog_readers import one_line as _one_line
from ese_assets.core.catalog_readers import read_table_file
from ese_assets.core.catalog_values import CatalogProblem
from ese_assets.core.errors import InputError
from ese_assets.core.frames import icrs_to_frame, image_center_and_radius, world_to_pixel

#: Cone pre-filter pad: absolute (deg) plus a fraction of the radius, so that rounding in the
#: corner distance or mild projection distortion can never drop a source the pixel test accepts.
CONE_PAD_DEG = 0.01
CONE_PAD_FRAC = 0.01


class CatalogError(InputError):
    """A catalog that cannot be used; the message names the file and the problem."""


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
        return cls(
            order=order,
            dec_sorted_deg=dec_deg[order],
            xyz_sorted=unit_vectors(ra_deg[order], dec_deg[order]),
        )

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

    def select_in_footprint(
        self,
        wcs,
        shape: tuple[int, int],
        *,
        min_flux_mjy: float = 0.0,
        edge_margin_pix: float = 0.0,
    ) -> np.ndarray:
        """Sorted indices of sources inside the image and at least as bright as ``min_flux_mjy``.

        ``wcs`` is a celestial 2-D astropy WCS in any frame :mod:`ese_assets.core.frames` supports
        (catalog positions are ICRS) and ``shape`` is (ny, nx). A source is inside when
        its 0-based pixel position (x, y) satisfies ``margin <= x <= nx - 1 - margin`` and the same
        for y. Sources with unknown (NaN) flux are kept only when ``min_flux_mjy <= 0``.
        """
        return self.footprint_positions(
            wcs, shape, min_flux_mjy=min_flux_mjy, edge_margin_pix=edge_margin_pix
        )[0]

    def footprint_positions(
        self,
        wcs,
        shape: tuple[int, int],
        *,
        min_flux_mjy: float = 0.0,
        edge_margin_pix: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`select_in_footprint` and the selected sources' (lon, lat) in the WCS's frame.

        Returns ``(idx, lon_deg, lat_deg)`` aligned: the positions to measure the image at, from
        the one frame transform the selection already made (none for ICRS images).
        """
        ny, nx = shape
        if len(self) == 0 or nx - 1 - 2 * edge_margin_pix < 0 or ny - 1 - 2 * edge_margin_pix < 0:
            return np.empty(0, dtype=np.int64), np.empty(0), np.empty(0)
        ra_c, dec_c, radius = image_center_and_radius(wcs, shape)
        radius = radius * (1.0 + CONE_PAD_FRAC) + CONE_PAD_DEG
        idx = self._index().cone(ra_c, dec_c, radius)
        if min_flux_mjy > 0:
            idx = idx[self.flux_mjy[idx] >= min_flux_mjy]
        lon, lat = icrs_to_frame(wcs, self.ra_deg[idx], self.dec_deg[idx])
        x, y = world_to_pixel(wcs, lon, lat)
        # NaN (positions that do not project) compare False and are dropped.
        inside = (
            (x >= edge_margin_pix)
            & (x <= nx - 1 - edge_margin_pix)
            & (y >= edge_margin_pix)
            & (y <= ny - 1 - edge_margin_pix)
        )
        order = np.argsort(idx[inside], kind="stable")
        return (
            idx[inside][order].astype(np.int64),
            np.asarray(lon)[inside][order],
            np.asarray(lat)[inside][order],
        )


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _catalog_error(path: str, reason: str) -> CatalogError:
    return CatalogError(path, " ".join(str(reason).split()))  # always one line


def _build(path: str, table: RawTable) -> tuple[Catalog, str]:
    try:
        columns: CatalogColumns = interpret_table(table)
    except CatalogProblem as exc:
        raise _catalog_error(path, str(exc)) from None
    catalog = Catalog(
        source_id=columns.source_id,
        ra_deg=columns.ra_deg,
        dec_deg=columns.dec_deg,
        flux_mjy=columns.flux_mjy,
        path=path,
    )
    return catalog, columns.description


def catalog_from_frame(path: str, frame, units: dict | None = None) -> Catalog:
    """Validate a table of sources (any supported column names) and build a Catalog.

    ``units`` maps column names (any case) to unit strings or astropy units.
    """
    table = RawTable(data=frame, units={str(k): str(v) for k, v in (units or {}).items()})
    return _build(os.fspath(path), table)[0]


def _load(path: str) -> tuple[Catalog, str]:
    """Catalog and a one-line description of which columns were read, in which units."""
    try:
        table = read_table_file(path)
    except CatalogProblem as exc:
        raise _catalog_error(path, str(exc)) from None
    try:
        return _build(path, table)
    except CatalogError:
        raise
    except Exception as exc:  # an unforeseen library error: still one line naming the file
        raise _catalog_error(path, f"cannot interpret catalog ({_one_line(exc)})") from exc


def load_catalog(path: str | os.PathLike) -> Catalog:
    """Read and validate a catalog file (format from the suffix; see the module docstring).

    Raises :class:`CatalogError` (``str`` is ``"<file>: <problem>"`` on one line) for every
    problem: missing or unreadable file, unknown format, no table, no RA/Dec columns (the message
    lists the columns found), an empty table, or impossible values (with their row numbers).
    """
    return _load(os.fspath(path))[0]


def check_catalog(path: str | os.PathLike) -> str:
    """Validate a catalog once (e.g. when a run or ``ese ingest`` starts); return one line such as
    ``"<file>: 1234 sources; RA 'RAJ2000' (sexagesimal hours), ...; flux 'Peak_flux' in Jy/beam"``.

    Uses the per-process cache, so the nightly work that follows does not read the file again.
    Raises :class:`CatalogError` exactly like :func:`load_catalog`.
    """
    catalog, description = _load_cached(path)
    return f"{catalog.path}: {description}"


# --------------------------------------------------------------------------------------------------
# Per-process cache
# --------------------------------------------------------------------------------------------------

#: Entries kept; a changed file gets a new key, and old versions of the same path are evicted.
CACHE_MAX_ENTRIES = 4
_cache: dict[tuple[str, int, int], tuple[Catalog, str]] = {}
_cache_lock = threading.Lock()


def load_catalog_cached(path: str | os.PathLike) -> Catalog:
    """:func:`load_catalog` memoised per process on (absolute path, mtime_ns, size).

    A rewritten file has a new mtime or size and is read again; the spatial index built by the
    first footprint selection is reused by every later call on the same file version.
    """
    return _load_cached(path)[0]


def _load_cached(path: str | os.PathLike) -> tuple[Catalog, str]:
    abspath = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(abspath)
    except FileNotFoundError:
        raise CatalogError(os.fspath(path), "file not found") from None
    except OSError as exc:
        raise _catalog_error(os.fspath(path), f"cannot access file ({exc.strerror})") from None
    key = (abspath, stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    loaded = _load(abspath)  # outside the lock: reading can take seconds
    with _cache_lock:
        for old in [k for k in _cache if k[0] == abspath]:  # superseded versions of this file
            del _cache[old]
        while len(_cache) >= CACHE_MAX_ENTRIES:  # dicts keep insertion order: drop the oldest
            del _cache[next(iter(_cache))]
        _cache[key] = loaded
    return loaded


def clear_catalog_cache() -> None:
    """Forget all cached catalogs (tests, or to release memory)."""
    with _cache_lock:
        _cache.clear()

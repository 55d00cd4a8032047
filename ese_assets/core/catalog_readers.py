"""Catalog readers: one file format each, to a :class:`RawTable` (the file's own column names plus
the units and coordinate frames the file declares). Problems raise :class:`CatalogProblem`.

Formats, chosen by suffix (:data:`READERS`)
    ``.csv .tsv .txt .dat``
        Text with a header line, separated by commas, tabs or whitespace (sexagesimal positions in
        whitespace-separated files must use colons). Leading ``#`` comment lines are skipped; when
        the first other line is data, the last comment line is the header (PyBDSF writes
        ``# Source_id Isl_id RA ...``). A unit row followed by a row of dashes after the header
        (VizieR TSV) gives the units. PyBDSF's ``# Equinox : 1950.0`` comment declares the frame.
    ``.ecsv``
        astropy ECSV; units from its header.
    ``.fits .fit .fits.gz .fit.gz``
        The first table HDU: ``TUNITn``; ``RADESYS``/``RADECSYS`` and ``EQUINOX``/``EPOCH`` of that
        HDU (or the primary header) declare the frame, with the FITS rule that an equinox before
        1984 without ``RADESYS`` means FK4.
    ``.vot .votable .xml``
        The first VOTable ``TABLE``: ``FIELD`` units; ``COOSYS`` frames (by each field's ``ref``,
        or the only ``COOSYS`` of the file).
    ``.sqlite .sqlite3 .db``
        The ``sources`` table (or view), opened read-only; names come from the file's own schema
        and are quoted, values are never interpolated.
"""

from __future__ import annotations

import csv
import os
import re
import sqlite3
import warnings
from pathlib import Path

import pandas as pd

from ese_assets.core.catalog_columns import (
    DEC_ALIASES,
    RA_ALIASES,
    RawTable,
    name_candidates,
    split_column_name,
)
from ese_assets.core.catalog_values import CatalogProblem, frame_name

SQLITE_TABLE = "sources"
#: Bytes sniffed for the header of a text table (comments, header, unit rows).
TEXT_HEAD_BYTES = 1 << 16
#: A line naming one of these is a header (position names only: a data row may well hold "S").
_POSITION_KEYS = frozenset(RA_ALIASES + DEC_ALIASES)
_DASHES = re.compile(r"^[\s\-|,=+]*-[\s\-|,=+]*$")
_EQUINOX_COMMENT = re.compile(r"equinox\s*[:=]\s*([bj]?\s*\d{4}(?:\.\d*)?)", re.IGNORECASE)


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line, shortened to 200 characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------------
# Text tables
# --------------------------------------------------------------------------------------------------


def _separator(line: str) -> str:
    return "," if "," in line else "\t" if "\t" in line else r"\s+"


def _split(line: str, sep: str) -> list[str]:
    line = line.strip().lstrip("#").strip()
    if sep == r"\s+":
        return line.split()
    return [
        field.strip() for field in next(csv.reader([line], delimiter=sep, skipinitialspace=True))
    ]


def _names_position_columns(fields: list[str]) -> bool:
    return any(
        split_column_name(f)[0] in _POSITION_KEYS or f.strip().lower() in _POSITION_KEYS
        for f in fields
    )


def _read_text(path: str) -> RawTable:
    with open(path, "rb") as handle:
        head = handle.read(TEXT_HEAD_BYTES)
    if b"\x00" in head:
        raise CatalogProblem("not a text table (binary content: wrong file or wrong suffix?)")
    lines = head.decode("utf-8", errors="replace").splitlines()
    if len(head) == TEXT_HEAD_BYTES:
        lines = lines[:-1]  # the last line may be cut
    first = 0
    while first < len(lines) and (not lines[first].strip() or lines[first].lstrip()[:1] == "#"):
        first += 1
    comments = [line for line in lines[:first] if line.strip()]
    file_frame = next(
        (frame_name(None, m.group(1)) for line in comments if (m := _EQUINOX_COMMENT.search(line))),
        None,
    )
    if first >= len(lines):
        raise CatalogProblem("catalog is empty (no header or rows)")
    sep = _separator(lines[first])
    names = _split(lines[first], sep)
    data_start = first + 1
    if not _names_position_columns(names) and comments:
        from_comment = _split(comments[-1], sep)
        if _names_position_columns(from_comment):  # PyBDSF: the header is the last comment line
            names, data_start = from_comment, first
    units: dict[str, str] = {}
    if data_start > first:  # a VizieR TSV unit row and/or dashes row may follow the header
        following = lines[data_start : data_start + 2]
        if following and _DASHES.match(following[0]):
            data_start += 1
        elif len(following) == 2 and _DASHES.match(following[1]):
            units = {n: u for n, u in zip(names, _split(following[0], sep), strict=False) if u}
            data_start += 2
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CatalogProblem(f"repeated column names in the header: {', '.join(repeated)}")
    data = pd.read_csv(
        path,
        sep=sep,
        header=None,
        names=names,
        skiprows=data_start,
        skipinitialspace=True,
        skip_blank_lines=True,
        dtype={name: str for name in name_candidates(names)},
        encoding="utf-8",
        encoding_errors="replace",
    )
    return RawTable(data=data, units=units, file_frame=file_frame)


# --------------------------------------------------------------------------------------------------
# astropy tables (FITS, VOTable, ECSV)
# --------------------------------------------------------------------------------------------------


def _to_frame(table) -> pd.DataFrame:
    """DataFrame of the 1-D columns (vector columns can be neither positions nor names)."""
    names = [name for name in table.colnames if table[name].ndim == 1]
    table = table[names]
    table.convert_bytestring_to_unicode()
    return table.to_pandas()


def _units_of(table) -> dict[str, str]:
    return {
        name: str(table[name].unit)
        for name in table.colnames
        if table[name].unit is not None and str(table[name].unit).strip()
    }


def _read_fits(path: str) -> RawTable:
    from astropy.io import fits
    from astropy.table import Table

    with warnings.catch_warnings():  # header verification warnings: errors surface on reading
        warnings.simplefilter("ignore")
        hdus = fits.open(path)
    with hdus:
        tables = [hdu for hdu in hdus if isinstance(hdu, fits.BinTableHDU | fits.TableHDU)]
        if not tables:
            raise CatalogProblem("no table in this FITS file (an image, not a catalog?)")
        header, primary = tables[0].header, hdus[0].header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unparsable TUNITs stay as text, which is enough
            table = Table.read(tables[0])
        system = header.get(
            "RADESYS", header.get("RADECSYS", primary.get("RADESYS", primary.get("RADECSYS")))
        )
        equinox = header.get(
            "EQUINOX", header.get("EPOCH", primary.get("EQUINOX", primary.get("EPOCH")))
        )
        return RawTable(
            data=_to_frame(table), units=_units_of(table), file_frame=frame_name(system, equinox)
        )


def _read_ecsv(path: str) -> RawTable:
    from astropy.table import Table

    table = Table.read(path, format="ascii.ecsv")
    return RawTable(data=_to_frame(table), units=_units_of(table))


def _read_votable(path: str) -> RawTable:
    from astropy.io.votable import parse

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VOTable specification warnings are not errors
        votable = parse(path, verify="ignore")
        tables = list(votable.iter_tables())
        if not tables:
            raise CatalogProblem("no TABLE in this VOTable")
        table = tables[0].to_table(use_names_over_ids=True)
    coosys = {c.ID: frame_name(c.system, c.equinox) for c in votable.iter_coosys()}
    fields = dict(zip(table.colnames, tables[0].fields, strict=False))
    units = {name: str(f.unit) for name, f in fields.items() if f.unit is not None}
    frames = {name: coosys[f.ref] for name, f in fields.items() if f.ref in coosys}
    only = next(iter(coosys.values())) if len(coosys) == 1 else None
    return RawTable(data=_to_frame(table), units=units, frames=frames, file_frame=only)


# --------------------------------------------------------------------------------------------------
# SQLite (the seed system's MASTER_SOURCES_DB)
# --------------------------------------------------------------------------------------------------


def _quote_identifier(name: str) -> str:
    """SQL identifier quoting; names come from the file's own schema, values are always bound."""
    return '"' + name.replace('"', '""') + '"'


def _read_sqlite(path: str) -> RawTable:
    """All rows of the ``sources`` table of an SQLite file, opened read-only."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise CatalogProblem(f"cannot open SQLite file ({exc})") from None
    try:
        found = connection.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND lower(name) = ?",
            (SQLITE_TABLE,),
        ).fetchone()
        if found is None:
            raise CatalogProblem(f"no '{SQLITE_TABLE}' table in SQLite file")
        cursor = connection.execute(f"SELECT * FROM {_quote_identifier(found[0])}")
        names = [d[0] for d in cursor.description]
        return RawTable(data=pd.DataFrame.from_records(cursor.fetchall(), columns=names))
    except sqlite3.DatabaseError as exc:
        raise CatalogProblem(f"cannot read SQLite file ({exc})") from None
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

READERS = (
    ((".csv", ".tsv", ".txt", ".dat"), "text table", _read_text),
    ((".ecsv",), "ECSV table", _read_ecsv),
    ((".fits", ".fit", ".fits.gz", ".fit.gz"), "FITS table", _read_fits),
    ((".vot", ".votable", ".xml"), "VOTable", _read_votable),
    ((".sqlite", ".sqlite3", ".db"), "SQLite file", _read_sqlite),
)
SUPPORTED_SUFFIXES = tuple(s for suffixes, _, _ in READERS for s in suffixes)


def read_table_file(path: str) -> RawTable:
    """Read a catalog file into a :class:`RawTable`; every failure is a :class:`CatalogProblem`."""
    if not os.path.exists(path):
        raise CatalogProblem("file not found")
    if os.path.isdir(path):
        raise CatalogProblem("is a directory, not a catalog file")
    lowered = path.lower()
    match = next(
        ((kind, reader) for suffixes, kind, reader in READERS if lowered.endswith(suffixes)), None
    )
    if match is None:
        raise CatalogProblem(f"unknown catalog format (expected {', '.join(SUPPORTED_SUFFIXES)})")
    kind, reader = match
    try:
        return reader(path)
    except CatalogProblem:
        raise
    except PermissionError:
        raise CatalogProblem("permission denied: cannot read the file") from None
    except pd.errors.EmptyDataError:
        raise CatalogProblem("catalog is empty (no header or rows)") from None
    except Exception as exc:  # parser errors of pandas/astropy: report on one line, do not guess
        raise CatalogProblem(f"cannot read as a {kind} ({one_line(exc)})") from None

"""A lightcurve as CSV or VOTable (``GET /api/v1/sources/{id}/lightcurve?format=csv|votable``).

The VOTable carries units (MJD in days, peak fluxes in Jy/beam and mJy/beam) and UCDs, so TOPCAT
or astropy read it with its meaning; its PARAMs give the source id, position and catalog flux.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from astropy.io.votable import from_table
from astropy.table import Table

#: Unit and UCD of each lightcurve column in the VOTable.
COLUMN_META: dict[str, tuple[str | None, str | None]] = {
    "mjd": ("d", "time.epoch"),
    "date_obs": (None, "time.epoch"),
    "peak_jyb": ("Jy/beam", "phot.flux.density"),
    "peak_err_jyb": ("Jy/beam", "stat.error;phot.flux.density"),
    "flux_mjy": ("mJy/beam", "phot.flux.density"),
    "flux_err_mjy": ("mJy/beam", "stat.error;phot.flux.density"),
    "normalized_flux_jy": ("Jy", "phot.flux.density;arith.ratio"),
    "quality_flag": (None, "meta.code.qual"),
    "used": (None, "meta.code"),
    "image_path": (None, "meta.ref.url"),
}

VOTABLE_MEDIA_TYPE = "application/x-votable+xml"
CSV_MEDIA_TYPE = "text/csv"


def download_name(source_id: str, extension: str) -> str:
    """A file name for the browser: the source id with anything but [A-Za-z0-9+-._] replaced."""
    return re.sub(r"[^A-Za-z0-9+\-._]+", "_", source_id).strip("_") + f"_lightcurve.{extension}"


def lightcurve_csv(lc: pd.DataFrame, source_id: str, fields: Sequence[str]) -> str:
    """CSV with a ``source_id`` column then ``fields``; empty values for missing numbers."""
    frame = lc[list(fields)].copy()
    frame.insert(0, "source_id", source_id)
    return frame.to_csv(index=False, float_format="%.10g", lineterminator="\n")


def lightcurve_votable(
    lc: pd.DataFrame, source_id: str, fields: Sequence[str], params: Mapping[str, Any]
) -> bytes:
    """A VOTable 1.4 document of the lightcurve (one TABLE named after the source)."""
    table = Table()
    for name in fields:
        values = lc[name]
        if name in ("date_obs", "image_path"):
            column = np.array([("" if v is None else str(v)) for v in values], dtype=str)
        elif name == "used":
            column = values.to_numpy(dtype=bool)
        elif name == "quality_flag":
            column = values.to_numpy(dtype=np.int32)
        else:
            column = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        table[name] = column
        unit, _ = COLUMN_META.get(name, (None, None))
        if unit is not None:
            table[name].unit = unit
    # The TABLE is named below: a name in the table's meta would make astropy invent an ID from
    # it (W03: '+' is not allowed in an XML ID).
    votable = from_table(table, table_id="lightcurve")
    resource_table = votable.get_first_table()
    resource_table.name = f"lightcurve {source_id}"
    for name in fields:
        _, ucd = COLUMN_META.get(name, (None, None))
        if ucd is not None:
            resource_table.get_field_by_id(name).ucd = ucd
    from astropy.io.votable.tree import Param

    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, str):
            param = Param(votable, name=key, ID=key, datatype="char", arraysize="*", value=value)
        else:
            unit = {"ra_deg": "deg", "dec_deg": "deg", "nvss_flux_mjy": "mJy"}.get(key)
            param = Param(
                votable, name=key, ID=key, datatype="double", value=float(value), unit=unit
            )
        resource_table.params.append(param)
    buffer = io.BytesIO()
    votable.to_xml(buffer)
    return buffer.getvalue()

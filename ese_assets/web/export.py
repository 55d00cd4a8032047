"""A source's lightcurve as a document (JSON, CSV or VOTable): one definition for the REST API
(``GET /api/v1/sources/{id}/lightcurve?format=...``) and ``ese export``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.web import formats, queries

#: Export formats: (media type, file extension).
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "json": ("application/json", "json"),
    "csv": (formats.CSV_MEDIA_TYPE, "csv"),
    "votable": (formats.VOTABLE_MEDIA_TYPE, "vot"),
}


@dataclass(frozen=True)
class LightcurveDocument:
    """``body``: the JSON document (a dict), the CSV text or the VOTable bytes."""

    source_id: str
    format: str
    body: dict[str, Any] | str | bytes
    n_points: int

    @property
    def media_type(self) -> str:
        return EXPORT_FORMATS[self.format][0]

    @property
    def extension(self) -> str:
        return EXPORT_FORMATS[self.format][1]


def lightcurve_document(
    engine: Engine,
    source_id: str,
    format: str = "json",
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    start_mjd: float | None = None,
    end_mjd: float | None = None,
) -> LightcurveDocument | None:
    """Every measurement of the source in time order (flagged ones too, ``used`` false when the
    statistics leave them out), with its position and catalog flux; None for an unknown source.

    JSON: ``{source_id, ra_deg, dec_deg, nvss_flux_mjy, n_points, data_points: [...]}``; CSV: a
    ``source_id`` column then the data point fields; VOTable: the same columns with units and
    UCDs, the position as PARAMs (:mod:`ese_assets.web.formats`).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {format!r}; one of {sorted(EXPORT_FORMATS)}")
    lc = queries.lightcurve(
        engine, source_id, exclude_flags=exclude_flags, start_mjd=start_mjd, end_mjd=end_mjd
    )
    stats = queries.variability(engine, source_id)
    if lc.empty and stats is None:
        return None
    fields = queries.lightcurve_fields(lc)
    first = queries.records(lc.head(1))[0] if len(lc) else {}
    position = {
        k: (stats or {}).get(k, first.get(k)) for k in ("ra_deg", "dec_deg", "nvss_flux_mjy")
    }
    if format == "csv":
        body: dict[str, Any] | str | bytes = formats.lightcurve_csv(lc, source_id, fields)
    elif format == "votable":
        body = formats.lightcurve_votable(
            lc, source_id, fields, {"source_id": source_id, **position}
        )
    else:
        body = {
            "source_id": source_id,
            **position,
            "n_points": len(lc),
            "data_points": queries.records(lc, fields),
        }
    return LightcurveDocument(source_id, format, body, len(lc))

"""What an ``ese_candidates`` materialization shows a person: the top open candidates as a table
(position, dip dates and depth, flag type, status) and small lightcurve plots of the first few,
embedded as PNG images in Markdown.

Cheap by construction: one ``variability_stats`` read and one lightcurve read for the plotted
sources, thumbnails of at most :data:`~ese_assets.plots.MAX_THUMBNAIL_BYTES` each.
"""

# No `from __future__ import annotations`: kept like the other orchestration modules.
import dagster as dg
import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.values import py_scalar
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.errors import DatabaseUnavailable

#: Rows of the ``top_candidates`` table.
TOP_CANDIDATES = 10
#: Candidates (the most significant) whose lightcurves are embedded as images.
PLOTTED_CANDIDATES = 5

#: Columns of ``top_candidates``: (name, type, decimals for floats).
TABLE_COLUMNS = (
    ("source_id", "string", None),
    ("status", "string", None),
    ("flag_type", "string", None),
    ("significance", "float", 2),
    ("ra_deg", "float", 5),
    ("dec_deg", "float", 5),
    ("dip_start", "string", None),  # ISO date-time (UTC) of dip_start_mjd
    ("dip_end", "string", None),
    ("dip_depth_frac", "float", 3),  # mean(window)/median - 1: < 0 for a dip
    ("dip_significance", "float", 2),
    ("n_obs", "int", None),
    ("mean_flux_mjy", "float", 2),
    ("night", "string", None),  # first flagged
)

_STATS_COLUMNS = ("source_id", "dip_start_mjd", "dip_end_mjd", "dip_depth_frac", "dip_n_epochs")


def with_dip_window(top: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Candidates ``top`` with the dip window of their ``variability_stats`` rows ``stats`` and
    its dates (``dip_start``, ``dip_end``: ISO, UTC)."""
    from ese_assets.plots import mjd_to_iso

    top = top.drop(columns=[c for c in _STATS_COLUMNS[1:] if c in top.columns]).merge(
        stats[list(_STATS_COLUMNS)], on="source_id", how="left"
    )
    return top.assign(
        dip_start=top["dip_start_mjd"].map(mjd_to_iso),
        dip_end=top["dip_end_mjd"].map(mjd_to_iso),
    ).reset_index(drop=True)


def candidates_table(top: pd.DataFrame) -> dg.TableMetadataValue:
    """``top`` as a typed table (:data:`TABLE_COLUMNS`) for the Dagster UI."""
    columns = [c for c in TABLE_COLUMNS if c[0] in top.columns]
    records = []
    for row in top.to_dict("records"):
        values = {}
        for name, kind, digits in columns:
            value = py_scalar(row.get(name))
            if value is not None and kind == "float":
                value = round(float(value), digits)
            elif value is not None and kind == "int":
                value = int(value)
            elif value is not None:
                value = str(value)
            values[name] = value
        records.append(dg.TableRecord(values))
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind, _ in columns])
    return dg.MetadataValue.table(records=records, schema=schema)


def _caption(row: dict) -> str:
    depth = py_scalar(row.get("dip_depth_frac"))
    window = (
        f"{row.get('dip_start')} → {row.get('dip_end')} UTC, mean {100 * depth:+.0f} % vs median"
        if row.get("dip_start") and depth is not None
        else "no event window"
    )
    return (
        f"**{row['source_id']}** · {row['status']} · {row['flag_type']} · significance "
        f"{row['significance']:.1f} · RA {row['ra_deg']:.5f}° Dec {row['dec_deg']:+.5f}° · "
        f"{window}"
    )


def candidate_plots_markdown(
    engine: Engine,
    top: pd.DataFrame,
    stats: pd.DataFrame,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
) -> str:
    """Markdown with a caption and an embedded PNG lightcurve per row of ``top`` (``stats``: their
    ``variability_stats`` rows); one lightcurve read for all of them."""
    from ese_assets import plots

    stats_by_id = {r["source_id"]: r for r in stats.to_dict("records")}
    lightcurves = photometry_db.lightcurves(engine, top["source_id"].tolist())
    thumbnail = plots.FigureConfig(style=plots.PlotStyle.THUMBNAIL)
    parts = []
    for row in top.to_dict("records"):
        lc = lightcurves[lightcurves["source_id"] == row["source_id"]]
        if lc.empty:
            parts.append(f"{_caption(row)}\n\n(no measurements)")
            continue
        fig = plots.lightcurve_figure(
            lc,
            stats_by_id.get(row["source_id"]),
            source_id=row["source_id"],
            exclude_flags=exclude_flags,
            config=thumbnail,
        )
        image = plots.markdown_png(plots.figure_png(fig), f"{row['source_id']} lightcurve")
        parts.append(f"{_caption(row)}\n\n{image}")
    return "\n\n".join(parts)


def candidate_metadata(
    engine: Engine,
    open_now: pd.DataFrame,
    log=None,
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    n_table: int = TOP_CANDIDATES,
    n_plots: int = PLOTTED_CANDIDATES,
) -> dict:
    """``top_candidates`` (table) and ``top_candidate_plots`` (Markdown with PNG lightcurves).

    The candidates are already written when this runs, so a drawing error does not fail the step:
    it is logged and stated in the metadata. A database outage still propagates (the step retry
    re-runs the idempotent detection).
    """
    if open_now.empty:
        return {}
    top = open_now.sort_values("significance", ascending=False, kind="mergesort").head(n_table)
    stats = statistics_db.variability_stats(engine, source_ids=top["source_id"].tolist())
    top = with_dip_window(top, stats)
    metadata: dict = {"top_candidates": candidates_table(top)}
    try:
        markdown = candidate_plots_markdown(engine, top.head(n_plots), stats, exclude_flags)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if log is not None:
            log.warning(f"lightcurve plots of the top candidates failed: {exc!r}")
        markdown = f"lightcurve plots could not be drawn: {type(exc).__name__}: {exc}"
    metadata["top_candidate_plots"] = dg.MetadataValue.md(markdown)
    return metadata

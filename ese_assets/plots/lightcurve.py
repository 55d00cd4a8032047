"""The lightcurve of one stored source: photometry rows, flags, baseline, event window, metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ese_assets.core.quality import (
    DEFAULT_EXCLUDED_FLAGS,
    FLAG_BLANK,
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_NAN,
    usable_measurement,
)
from ese_assets.plots.figures import (
    GID_BASELINE,
    GID_BASELINE_LEVEL,
    GID_CLEAN,
    GID_EVENT,
    GID_EXCLUDED,
    GID_FLAGGED,
    GID_RAW,
    GID_TEMPLATE,
    FigureConfig,
    PlotStyle,
    add_date_axis,
    errorbar,
    new_figure,
    safe_filename,
)

#: The baseline of a lightcurve: its first BASELINE_EPOCHS usable epochs (the seed's definition).
BASELINE_EPOCHS = 10

#: Optional photometry columns of normalized fluxes (the seed's ``normalized_flux_jy``).
NORMALIZED_FLUX_COLUMN = "normalized_flux_jy"
NORMALIZED_ERR_COLUMN = "normalized_flux_err_jy"

_FLAG_NAMES = {
    FLAG_EDGE: "edge",
    FLAG_NAN: "blank pixels in stamp",
    FLAG_BLENDED: "blended",
    FLAG_BLANK: "blank",
}


def default_lightcurve_path(source_id: str) -> Path:
    """The seed's default output file: ``<source_id>_lightcurve.png`` in the working directory."""
    return Path(f"{safe_filename(source_id)}_lightcurve.png")


# ------------------------------------------------------------------------------------------------
# A stored lightcurve with its statistics
# ------------------------------------------------------------------------------------------------


def _flag_label(flags: np.ndarray) -> str:
    bits = int(np.bitwise_or.reduce(flags)) if len(flags) else 0
    names = [name for bit, name in _FLAG_NAMES.items() if bits & bit]
    return ", ".join(names) or "flagged"


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec)


def metrics_title(
    source_id: str, stats: Mapping[str, Any] | None, candidate=None, compact: bool = False
) -> str:
    """Two lines: the source (and its candidate's status and flag type), then its metrics;
    ``compact``: one line (thumbnails)."""
    head = str(source_id)
    if compact:
        stats = stats or {}
        return (
            f"{head}  n_obs={_fmt(stats.get('n_obs'), 'd')}  "
            f"dip S={_fmt(stats.get('dip_significance'), '.1f')}"
        )
    if candidate:
        head += (
            f"  ·  candidate {candidate.get('status')} ({candidate.get('flag_type')}, "
            f"significance {_fmt(candidate.get('significance'), '.1f')})"
        )
    if not stats:
        return head + "\nno variability statistics yet"
    metrics = (
        f"n_obs={_fmt(stats.get('n_obs'), 'd')}  χ²_ν={_fmt(stats.get('chi2_nu'))}  "
        f"η={_fmt(stats.get('eta_metric'))}  V={_fmt(stats.get('v_index'))}  "
        f"σ_dev={_fmt(stats.get('sigma_deviation'), '.2f')}  "
        f"dip S={_fmt(stats.get('dip_significance'), '.2f')}"
    )
    return f"{head}\n{metrics}"


def _fluxes(
    lc: pd.DataFrame, use_normalized: bool, source_id: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Flux and error (mJy/beam) to plot, and the axis label."""
    raw = lc["peak_jyb"].to_numpy(dtype=float) * 1e3
    raw_err = lc["peak_err_jyb"].to_numpy(dtype=float) * 1e3
    if not use_normalized:
        return raw, raw_err, "peak flux density (mJy/beam)"
    if NORMALIZED_FLUX_COLUMN not in lc.columns:
        raise ValueError(
            f"{source_id}: the photometry has no {NORMALIZED_FLUX_COLUMN} column (a table from "
            "elsewhere; the pipeline's calibration step writes it); plot the raw fluxes instead "
            "(use_normalized=False, or ese plot without --normalized)"
        )
    norm = lc[NORMALIZED_FLUX_COLUMN].to_numpy(dtype=float) * 1e3
    if not np.isfinite(norm).any():
        raise ValueError(f"{source_id}: no measurement has a {NORMALIZED_FLUX_COLUMN} value")
    if NORMALIZED_ERR_COLUMN in lc.columns:
        norm_err = lc[NORMALIZED_ERR_COLUMN].to_numpy(dtype=float) * 1e3
    else:  # the same fractional error as the raw measurement
        with np.errstate(divide="ignore", invalid="ignore"):
            norm_err = raw_err * np.abs(norm / raw)
    return norm, norm_err, "normalized flux density (mJy/beam)"


def baseline_span(mjd: np.ndarray, usable: np.ndarray) -> tuple[float, float, np.ndarray] | None:
    """``(first, last, index)`` of the first :data:`BASELINE_EPOCHS` usable epochs (time order)."""
    index = np.flatnonzero(usable)[:BASELINE_EPOCHS]
    if len(index) == 0:
        return None
    return float(mjd[index[0]]), float(mjd[index[-1]]), index


def lightcurve_figure(
    measurements: pd.DataFrame,
    stats: Mapping[str, Any] | None = None,
    *,
    source_id: str | None = None,
    candidate: Mapping[str, Any] | None = None,
    use_normalized: bool = False,
    highlight_baseline: bool = True,
    highlight_ese_period: bool = True,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    template: tuple[Iterable[float], Iterable[float]] | None = None,
    config: FigureConfig | None = None,
) -> Figure:
    """The lightcurve of one source from its ``photometry`` rows and ``variability_stats`` row.

    ``measurements``: photometry rows (``mjd``, ``peak_jyb``, ``peak_err_jyb``, ``quality_flag``;
    optionally ``normalized_flux_jy`` and ``normalized_flux_err_jy``). ``stats``: the source's
    ``variability_stats`` row (title metrics, event window). ``candidate``: its candidate row
    (status and flag type in the title). ``template``: a fitted model ``(mjd, flux_mjy)`` to draw
    over the data, when there is one. Raises ValueError for an empty lightcurve, or for
    ``use_normalized`` without normalized fluxes.
    """
    source_id = str(
        source_id
        if source_id is not None
        else measurements["source_id"].iloc[0]
        if len(measurements)
        else "?"
    )
    if measurements.empty:
        raise ValueError(f"no measurements for source {source_id!r}")
    lc = measurements.sort_values("mjd", kind="mergesort").reset_index(drop=True)
    mjd = lc["mjd"].to_numpy(dtype=float)
    flags = lc["quality_flag"].fillna(0).to_numpy(dtype=np.int64)
    usable = usable_measurement(flags, exclude_flags) & np.isfinite(lc["peak_jyb"].to_numpy(float))
    y, yerr, ylabel = _fluxes(lc, use_normalized, source_id)
    shown = np.isfinite(y)
    config = config or FigureConfig()
    _, _, _, legend = config.resolved()
    compact = PlotStyle(config.style) is PlotStyle.THUMBNAIL
    stats = dict(stats) if stats else None

    with mpl.rc_context(config.rc_params()):
        fig = new_figure(config)
        ax = fig.add_subplot()
        if use_normalized:
            ax.plot(
                mjd,
                lc["peak_jyb"].to_numpy(float) * 1e3,
                ".",
                color="0.75",
                ms=3,
                label="raw",
                gid=GID_RAW,
                zorder=1,
            )
        clean = usable & (flags == 0) & shown
        flagged = usable & (flags != 0) & shown
        excluded = ~usable & shown
        errorbar(
            ax,
            mjd[clean],
            y[clean],
            yerr[clean],
            GID_CLEAN,
            fmt="o",
            ms=4,
            capsize=2,
            color="C0",
            label=f"measurements ({clean.sum()})" if clean.any() else "_nolegend_",
            zorder=3,
        )
        if flagged.any():
            errorbar(
                ax,
                mjd[flagged],
                y[flagged],
                yerr[flagged],
                GID_FLAGGED,
                fmt="s",
                ms=5,
                mfc="none",
                color="C1",
                capsize=2,
                zorder=3,
                label=f"flagged, used: {_flag_label(flags[flagged])} ({flagged.sum()})",
            )
        if excluded.any():
            errorbar(
                ax,
                mjd[excluded],
                y[excluded],
                yerr[excluded],
                GID_EXCLUDED,
                fmt="x",
                ms=5,
                color="0.5",
                capsize=0,
                zorder=2,
                label=f"excluded from statistics: {_flag_label(flags[excluded])} "
                f"({excluded.sum()})",
            )
        if highlight_baseline:
            span = baseline_span(mjd, usable & shown)
            if span is not None:
                first, last, index = span
                ax.axvspan(
                    first,
                    last,
                    color="C2",
                    alpha=0.12,
                    gid=GID_BASELINE,
                    zorder=0,
                    label=f"baseline: first {len(index)} epochs",
                )
                ax.axhline(
                    float(np.median(y[index])),
                    color="C2",
                    ls="--",
                    lw=1,
                    gid=GID_BASELINE_LEVEL,
                    zorder=1,
                )
        if highlight_ese_period and stats:
            start, end = stats.get("dip_start_mjd"), stats.get("dip_end_mjd")
            if start is not None and end is not None and np.isfinite([start, end]).all():
                kind = "spike" if (stats.get("dip_significance") or 0) > 0 else "dip"
                depth = stats.get("dip_depth_frac")
                ax.axvspan(
                    start,
                    end,
                    color="C3",
                    alpha=0.15,
                    gid=GID_EVENT,
                    zorder=0,
                    label=f"{kind} window ({stats.get('dip_n_epochs')} epochs, mean "
                    f"{_fmt(None if depth is None else 100 * depth, '+.0f')}% vs median)",
                )
        if template is not None:
            t_mjd, t_flux = (np.asarray(v, dtype=float) for v in template)
            ax.plot(
                t_mjd,
                t_flux,
                "-",
                color="C3",
                lw=1.2,
                label="fitted template",
                gid=GID_TEMPLATE,
                zorder=4,
            )
        ax.set_ylabel("mJy/beam" if compact else ylabel)
        ax.set_title(metrics_title(source_id, stats, candidate, compact=compact))
        add_date_axis(ax, label=not compact)
        if compact:  # fewer MJD labels, so they do not overlap
            ax.xaxis.set_major_locator(MaxNLocator(4))
        if legend:
            ax.legend(loc="best", framealpha=0.8)
    return fig

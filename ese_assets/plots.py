"""Lightcurve and η–V plots (matplotlib, headless): an interface layer over the stored tables.

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas, never through
``pyplot``: nothing depends on a display or on the user's backend, and no figure is kept in
pyplot's registry (a long-running server or a Dagster run does not accumulate them). In Jupyter
the returned Figure still displays inline.

What a lightcurve plot shows (:func:`lightcurve_figure`):

* peak flux density (mJy/beam) with its error against MJD, a calendar-date axis on top (UTC);
* measurements with a ``quality_flag`` drawn differently: open squares for flagged measurements
  that the statistics use (blended, some blank pixels in the stamp), grey crosses for those left
  out of the statistics (``exclude_flags``);
* the baseline: the first :data:`BASELINE_EPOCHS` usable epochs (the seed's definition), shaded,
  with their median as a dashed line;
* the event window: ``dip_start_mjd``..``dip_end_mjd`` of ``variability_stats`` (the run of
  epochs the dip statistic found), shaded, not the whole span;
* the metrics in the title: n_obs, χ²_ν, η, V, σ_deviation and the dip significance S;
* with ``use_normalized``, the normalized fluxes (``normalized_flux_jy``) with the raw ones faint
  behind them. A lightcurve without normalized fluxes raises ValueError naming the missing column:
  a figure labelled "normalized" must never show raw fluxes, and a warning is easily lost in a
  batch script.

The η–V diagram (:func:`eta_v_figure`) plots log10 ``eta_metric`` against log10 ``v_index`` of the
population, open candidates highlighted.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ese_assets.core.quality import (
    DEFAULT_EXCLUDED_FLAGS,
    FLAG_BLANK,
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_NAN,
    usable_measurement,
)

#: The baseline of a lightcurve: its first BASELINE_EPOCHS usable epochs (the seed's definition).
BASELINE_EPOCHS = 10

#: Formats a figure can be written in, by file extension.
SAVE_FORMATS = ("png", "pdf", "svg")

#: Optional photometry columns of normalized fluxes (the seed's ``normalized_flux_jy``).
NORMALIZED_FLUX_COLUMN = "normalized_flux_jy"
NORMALIZED_ERR_COLUMN = "normalized_flux_err_jy"

#: Embedded thumbnails (asset metadata) are re-rendered at lower resolution until this small.
MAX_THUMBNAIL_BYTES = 40_000

# MJD 0 = 1858-11-17T00:00 UTC; matplotlib date numbers are days since its own epoch.
_MJD_ZERO = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)

_FLAG_NAMES = {
    FLAG_EDGE: "edge",
    FLAG_NAN: "blank pixels in stamp",
    FLAG_BLENDED: "blended",
    FLAG_BLANK: "blank",
}

# Artist ids (``Artist.get_gid()``): what each plotted element is, for tests and for SVG output.
GID_CLEAN = "measurements"
GID_FLAGGED = "flagged"
GID_EXCLUDED = "excluded"
GID_RAW = "raw"
GID_BASELINE = "baseline"
GID_BASELINE_LEVEL = "baseline-level"
GID_EVENT = "event"
GID_TEMPLATE = "template"
GID_POPULATION = "population"
GID_CANDIDATES = "candidates"


class PlotStyle(enum.Enum):
    """Figure presets (the seed's ``PlotStyle``)."""

    QUICKLOOK = "quicklook"  # screen: ``ese plot``, ``Source.plot_lightcurve``
    PUBLICATION = "publication"  # a journal column, serif, 300 dpi
    PRESENTATION = "presentation"  # slides: large fonts
    THUMBNAIL = "thumbnail"  # asset metadata: small, no legend


# figsize (inches), dpi, font size, legend
_STYLE_DEFAULTS: dict[PlotStyle, tuple[tuple[float, float], int, float, bool]] = {
    PlotStyle.QUICKLOOK: ((9.0, 5.0), 110, 9.0, True),
    PlotStyle.PUBLICATION: ((6.5, 3.8), 300, 8.0, True),
    PlotStyle.PRESENTATION: ((11.0, 6.0), 110, 14.0, True),
    PlotStyle.THUMBNAIL: ((4.8, 2.6), 80, 6.5, False),
}


@dataclass(frozen=True)
class FigureConfig:
    """Size and look of a figure (the seed's ``FigureConfig``); None takes the style's value."""

    style: PlotStyle = PlotStyle.QUICKLOOK
    figsize: tuple[float, float] | None = None
    dpi: int | None = None
    font_size: float | None = None
    legend: bool | None = None
    rc: Mapping[str, Any] = field(default_factory=dict)  # extra matplotlib rcParams

    def resolved(self) -> tuple[tuple[float, float], int, float, bool]:
        figsize, dpi, font_size, legend = _STYLE_DEFAULTS[PlotStyle(self.style)]
        return (
            self.figsize or figsize,
            self.dpi or dpi,
            self.font_size or font_size,
            legend if self.legend is None else self.legend,
        )

    def rc_params(self) -> dict[str, Any]:
        _, _, font_size, _ = self.resolved()
        params = {
            "font.size": font_size,
            "axes.titlesize": font_size,
            "legend.fontsize": 0.85 * font_size,
        }
        if PlotStyle(self.style) is PlotStyle.PUBLICATION:
            params.update(
                {"font.family": "serif", "xtick.direction": "in", "ytick.direction": "in"}
            )
        return {**params, **dict(self.rc)}


def new_figure(config: FigureConfig | None = None) -> Figure:
    """An empty Figure (constrained layout) of ``config``'s size; not registered with pyplot."""
    figsize, dpi, _, _ = (config or FigureConfig()).resolved()
    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def check_save_path(path: str | Path) -> str:
    """The format of ``path`` from its extension, or ValueError naming the accepted ones."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in SAVE_FORMATS:
        raise ValueError(
            f"{path}: cannot tell the figure format from the extension {suffix or '(none)'!r}; "
            f"use one of {', '.join('.' + f for f in SAVE_FORMATS)}"
        )
    return suffix


def save_figure(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write ``fig`` to ``path`` in the format of its extension (.png, .pdf, .svg); return it."""
    path = Path(path).expanduser()
    fmt = check_save_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=dpi or fig.dpi)
    return path


def safe_filename(text: str) -> str:
    """``text`` usable as a file name: runs of characters other than letters, digits, ``+-.``
    become ``_`` (source ids like ``NVSS J123456+420312`` contain spaces)."""
    return re.sub(r"[^A-Za-z0-9+.-]+", "_", str(text)).strip("_") or "source"


def default_lightcurve_path(source_id: str) -> Path:
    """The seed's default output file: ``<source_id>_lightcurve.png`` in the working directory."""
    return Path(f"{safe_filename(source_id)}_lightcurve.png")


def mjd_to_datenum(mjd):
    """MJD (UTC) -> matplotlib date number (days since matplotlib's epoch): a constant shift."""
    return np.asarray(mjd, dtype=float) + mdates.date2num(_MJD_ZERO)


def datenum_to_mjd(datenum):
    """Inverse of :func:`mjd_to_datenum`."""
    return np.asarray(datenum, dtype=float) - mdates.date2num(_MJD_ZERO)


def mjd_to_iso(mjd: float | None) -> str | None:
    """``YYYY-MM-DD HH:MM`` (UTC) of an MJD, to the nearest minute; None for a missing value."""
    if mjd is None or not np.isfinite(mjd):
        return None
    minutes = round(float(mjd) * 1440.0)  # MJDs from seconds carry ~1e-6 s of rounding
    return (_MJD_ZERO + dt.timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M")


def _add_date_axis(ax, label: bool = True) -> None:
    """MJD below in plain numbers, the calendar dates (UTC) on a secondary axis on top."""
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel("MJD")
    top = ax.secondary_xaxis("top", functions=(mjd_to_datenum, datenum_to_mjd))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    top.xaxis.set_major_locator(locator)
    top.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if label:
        top.set_xlabel("date (UTC)")


def _errorbar(ax, x, y, yerr, gid: str, **kwargs):
    container = ax.errorbar(x, y, yerr=yerr, linestyle="none", **kwargs)
    container.lines[0].set_gid(gid)  # the data line; bars and caps follow it
    for cap in container.lines[1]:
        cap.set_gid(f"{gid}-caps")
    for bars in container.lines[2]:  # one LineCollection of vertical bars
        bars.set_gid(f"{gid}-errorbars")
    return container


# ------------------------------------------------------------------------------------------------
# The seed's module-level plot_lightcurve
# ------------------------------------------------------------------------------------------------


def _times_to_mjd(times) -> np.ndarray:
    if hasattr(times, "mjd"):  # astropy Time
        return np.atleast_1d(np.asarray(times.mjd, dtype=float))
    values = np.atleast_1d(np.asarray(times))
    if np.issubdtype(values.dtype, np.datetime64):
        from astropy.time import Time

        return np.atleast_1d(Time(values, scale="utc").mjd)
    return values.astype(float)


def _values_and_unit(values) -> tuple[np.ndarray | None, str | None]:
    if values is None:
        return None, None
    unit = getattr(values, "unit", None)  # astropy Quantity
    if unit is not None:
        return np.atleast_1d(np.asarray(values.value, dtype=float)), unit.to_string()
    return np.atleast_1d(np.asarray(values, dtype=float)), None


def plot_lightcurve(
    flux,
    times,
    errors=None,
    config: FigureConfig | None = None,
    title: str | None = None,
    output: str | Path | None = None,
    *,
    flux_unit: str | None = None,
) -> Figure:
    """The seed's ``plot_lightcurve``: ``flux`` (± ``errors``) against ``times``.

    ``times``: an astropy ``Time`` or MJD values (or datetime64); ``flux``/``errors``: arrays or
    astropy Quantities (their unit labels the axis, else ``flux_unit`` if given). ``output``:
    also write the figure there (.png, .pdf or .svg). Returns the Figure.
    """
    mjd = _times_to_mjd(times)
    y, unit = _values_and_unit(flux)
    yerr, _ = _values_and_unit(errors)
    if len(y) != len(mjd) or (yerr is not None and len(yerr) != len(y)):
        raise ValueError(
            f"plot_lightcurve: flux ({len(y)}), times ({len(mjd)})"
            + (f" and errors ({len(yerr)})" if yerr is not None else "")
            + " must have the same length"
        )
    if output is not None:
        check_save_path(output)  # before drawing
    config = config or FigureConfig()
    unit = unit or flux_unit
    with mpl.rc_context(config.rc_params()):
        fig = new_figure(config)
        ax = fig.add_subplot()
        _errorbar(ax, mjd, y, yerr, GID_CLEAN, fmt="o", ms=4, capsize=2)
        ax.set_ylabel(f"flux density ({unit})" if unit else "flux density")
        _add_date_axis(ax)
        if title:
            ax.set_title(title)
    if output is not None:
        save_figure(fig, output)
    return fig


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
            f"{source_id}: the photometry has no {NORMALIZED_FLUX_COLUMN} column (normalized "
            "fluxes are not computed by this pipeline yet); plot the raw fluxes instead "
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
        _errorbar(
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
            _errorbar(
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
            _errorbar(
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
        _add_date_axis(ax, label=not compact)
        if legend:
            ax.legend(loc="best", framealpha=0.8)
    return fig


def eta_v_figure(
    stats: pd.DataFrame,
    highlight_ids: Iterable[str] = (),
    *,
    config: FigureConfig | None = None,
    label_highlighted: int = 15,
) -> Figure:
    """The η–V diagram: log10 ``eta_metric`` (x) against log10 ``v_index`` (y) of every source in
    ``stats`` (``variability_stats`` rows), the ``highlight_ids`` (open candidates) marked and,
    up to ``label_highlighted`` of them, named. Sources without positive η and V cannot be placed
    on log axes; their number is stated in the title."""
    highlight = {str(s) for s in highlight_ids}
    ids = stats["source_id"].astype(str).to_numpy()
    eta = stats["eta_metric"].to_numpy(dtype=float)
    v = stats["v_index"].to_numpy(dtype=float)
    placed = np.isfinite(eta) & np.isfinite(v) & (eta > 0) & (v > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = np.log10(eta), np.log10(v)
    marked = placed & np.isin(ids, list(highlight))
    config = config or FigureConfig()
    _, _, _, legend = config.resolved()
    with mpl.rc_context(config.rc_params()):
        fig = new_figure(config)
        ax = fig.add_subplot()
        ax.plot(
            x[placed & ~marked],
            y[placed & ~marked],
            ".",
            color="0.45",
            ms=4,
            label=f"sources ({(placed & ~marked).sum()})",
            gid=GID_POPULATION,
        )
        ax.plot(
            x[marked],
            y[marked],
            "*",
            color="C3",
            ms=11,
            mec="k",
            mew=0.5,
            label=f"open candidates ({marked.sum()})",
            gid=GID_CANDIDATES,
            zorder=3,
        )
        if marked.sum() <= label_highlighted:
            for sid, xi, yi in zip(ids[marked], x[marked], y[marked], strict=True):
                ax.annotate(
                    sid, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="x-small"
                )
        ax.set_xlabel("log₁₀ η (eta_metric)")
        ax.set_ylabel("log₁₀ V (v_index)")
        title = f"η–V diagram: {placed.sum()} sources"
        if (~placed).any():
            title += f" ({(~placed).sum()} without positive η and V not shown)"
        missing = sorted(highlight - set(ids[marked]))
        if missing:
            title += f"\n{len(missing)} open candidate(s) not placed: {', '.join(missing[:5])}"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(loc="best", framealpha=0.8)
    return fig


# ------------------------------------------------------------------------------------------------
# Embedding (asset metadata)
# ------------------------------------------------------------------------------------------------


def figure_png(fig: Figure, max_bytes: int = MAX_THUMBNAIL_BYTES) -> bytes:
    """PNG bytes of ``fig``, re-rendered at lower dpi until at most ``max_bytes`` (ValueError if
    even 30 dpi is larger)."""
    dpi = float(fig.dpi)
    while True:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"optimize": True})
        data = buffer.getvalue()
        if len(data) <= max_bytes:
            return data
        if dpi <= 30:
            raise ValueError(f"figure PNG is {len(data)} bytes at {dpi:.0f} dpi (> {max_bytes})")
        dpi = max(30.0, dpi * 0.8)


def markdown_png(png: bytes, alt: str) -> str:
    """Markdown that shows PNG bytes inline (a base64 data URI, as the Dagster UI renders it)."""
    alt = re.sub(r"[\[\]\n]", " ", alt)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"

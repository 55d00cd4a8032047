"""Figures without pyplot: styles (the seed's ``FigureConfig``, ``PlotStyle``), saving by file
extension, the MJD and calendar-date axes, PNG embedding, and the seed's ``plot_lightcurve``."""

from __future__ import annotations

import base64
import datetime as dt
import enum
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.dates as mdates
import numpy as np
from matplotlib.figure import Figure

#: Formats a figure can be written in, by file extension.
SAVE_FORMATS = ("png", "pdf", "svg")

#: Embedded thumbnails (asset metadata) are re-rendered at lower resolution until this small.
MAX_THUMBNAIL_BYTES = 40_000

# MJD 0 = 1858-11-17T00:00 UTC; matplotlib date numbers are days since its own epoch.
_MJD_ZERO = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)

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
    PlotStyle.THUMBNAIL: ((5.0, 2.7), 96, 7.0, False),
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
    """An empty Figure of ``config``'s size, not registered with pyplot. Constrained layout,
    except thumbnails: fixed margins draw them twice as fast (asset metadata draws several)."""
    config = config or FigureConfig()
    figsize, dpi, _, _ = config.resolved()
    if PlotStyle(config.style) is PlotStyle.THUMBNAIL:
        fig = Figure(figsize=figsize, dpi=dpi)
        fig.subplots_adjust(left=0.12, right=0.98, bottom=0.16, top=0.8)
        return fig
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


def add_date_axis(ax, label: bool = True) -> None:
    """MJD below in plain numbers, the calendar dates (UTC) on a secondary axis on top."""
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel("MJD")
    top = ax.secondary_xaxis("top", functions=(mjd_to_datenum, datenum_to_mjd))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    top.xaxis.set_major_locator(locator)
    top.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if label:
        top.set_xlabel("date (UTC)")


def errorbar(ax, x, y, yerr, gid: str, **kwargs):
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
        errorbar(ax, mjd, y, yerr, GID_CLEAN, fmt="o", ms=4, capsize=2)
        ax.set_ylabel(f"flux density ({unit})" if unit else "flux density")
        add_date_axis(ax)
        if title:
            ax.set_title(title)
    if output is not None:
        save_figure(fig, output)
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

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

from ese_assets.plots.eta_v import eta_v_figure
from ese_assets.plots.figures import (
    GID_BASELINE,
    GID_BASELINE_LEVEL,
    GID_CANDIDATES,
    GID_CLEAN,
    GID_EVENT,
    GID_EXCLUDED,
    GID_FLAGGED,
    GID_POPULATION,
    GID_RAW,
    GID_TEMPLATE,
    MAX_THUMBNAIL_BYTES,
    SAVE_FORMATS,
    FigureConfig,
    PlotStyle,
    check_save_path,
    datenum_to_mjd,
    figure_png,
    markdown_png,
    mjd_to_datenum,
    mjd_to_iso,
    new_figure,
    plot_lightcurve,
    safe_filename,
    save_figure,
)
from ese_assets.plots.lightcurve import (
    BASELINE_EPOCHS,
    NORMALIZED_ERR_COLUMN,
    NORMALIZED_FLUX_COLUMN,
    baseline_span,
    default_lightcurve_path,
    lightcurve_figure,
    metrics_title,
)

__all__ = [
    "BASELINE_EPOCHS",
    "GID_BASELINE",
    "GID_BASELINE_LEVEL",
    "GID_CANDIDATES",
    "GID_CLEAN",
    "GID_EVENT",
    "GID_EXCLUDED",
    "GID_FLAGGED",
    "GID_POPULATION",
    "GID_RAW",
    "GID_TEMPLATE",
    "MAX_THUMBNAIL_BYTES",
    "NORMALIZED_ERR_COLUMN",
    "NORMALIZED_FLUX_COLUMN",
    "SAVE_FORMATS",
    "FigureConfig",
    "PlotStyle",
    "baseline_span",
    "check_save_path",
    "datenum_to_mjd",
    "default_lightcurve_path",
    "eta_v_figure",
    "figure_png",
    "lightcurve_figure",
    "markdown_png",
    "metrics_title",
    "mjd_to_datenum",
    "mjd_to_iso",
    "new_figure",
    "plot_lightcurve",
    "safe_filename",
    "save_figure",
]

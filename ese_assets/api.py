"""Python API with the names users of the seed system know.

>>> from ese_assets.api import detect_ese_candidates, Source
>>> candidates = detect_ese_candidates("data/demo/products.sqlite3", preset="conservative")
>>> Source("SIM J100012+300455", products_db="data/demo/products.sqlite3").measurements
>>> Source("SIM J100012+300455", products_db="data/demo/products.sqlite3").plot_lightcurve(
...     save=True, outfile="lightcurve.png")
>>> PhotometryManager(products_db_path=None).measure_for_fits(
...     "image.fits", config=PhotometryConfig(min_flux_mjy=10.0)).measurements

Plots are drawn by :mod:`ese_assets.plots` (the seed's ``visualization`` module: its
``plot_lightcurve``, ``FigureConfig`` and ``PlotStyle``); matplotlib is imported only when a plot
is made.

``products_db`` is a path to an SQLite file or an SQLAlchemy URL everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from ese_assets import pipeline
from ese_assets.core import ese_template
from ese_assets.core.binning import DEFAULT_BIN_NIGHTS
from ese_assets.core.calibration import DEFAULT_FLUX_SCALE
from ese_assets.core.candidates import OPEN_STATUSES
from ese_assets.core.detection import (
    DEFAULT_MIN_DIP_SIGMA,
    DEFAULT_MIN_OBS,
    DEFAULT_MIN_SIGMA,
    DetectionSettings,
    resolve_min_sigma,
    sigma_rule_requested,
)
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, FLAG_BAD_GAIN
from ese_assets.core.relative import (
    DEFAULT_MAX_ETA,
    DEFAULT_MIN_NEIGHBORS,
    DEFAULT_RADIUS_DEG,
    RelativeLightcurve,
    relative_lightcurve,
)
from ese_assets.core.values import py_scalar
from ese_assets.core.variability import DEFAULT_DIP_WINDOW_DAYS, DEFAULT_FLUX_SCALE_ERROR

# ESE detection on any pipeline's measurement table (calibration, bins, template fit, FAPs).
from ese_assets.lightcurves import detect_in_lightcurves as detect_in_lightcurves

# The same on the pipeline's products database (read-only; usable rows, stored calibration).
from ese_assets.lightcurves_products import detect_in_products as detect_in_products
from ese_assets.photometry import PhotometryConfig, PhotometryManager, PhotometryResult
from ese_assets.pipeline.candidates import (
    SEED_CANDIDATE_FIELDS,
    new_run_id,
    seed_candidate_records,
)
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import cone as cone_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import open_existing

if TYPE_CHECKING:  # matplotlib is imported when a plot is made, not with the API
    from matplotlib.figure import Figure

    from ese_assets.plots import FigureConfig

#: flag_types of the template fit whose fitted model a lightcurve plot draws (an event).
EVENT_TYPES = (ese_template.FLAG_ESE, ese_template.FLAG_DIP, ese_template.FLAG_SPIKE)
#: MJDs at which the fitted model is drawn, evenly over the lightcurve.
TEMPLATE_GRID_POINTS = 2000

#: Fields of one candidate in ``detect_ese_candidates`` output (the seed's JSON fields).
CANDIDATE_FIELDS = SEED_CANDIDATE_FIELDS

#: Quality bits a relative lightcurve leaves out: the pipeline's, except the bad-gain bit (an
#: image's flux-scale error cancels in the ratio to its neighbours).
RELATIVE_EXCLUDED_FLAGS = DEFAULT_EXCLUDED_FLAGS & ~FLAG_BAD_GAIN

#: The seed's forced photometry (``photometry.manager``), re-exported with the rest of the API.
__all__ = [
    "CANDIDATE_FIELDS",
    "PhotometryConfig",
    "PhotometryManager",
    "PhotometryResult",
    "Source",
    "auto_detect_ese_for_new_measurements",
    "detect_ese_candidates",
    "plot_eta_v",
    "plot_lightcurve",
    "update_variability_stats_for_source",
]


def _engine(products_db: str | Path | Engine) -> Engine:
    """The engine of an existing products database: a missing one raises FileNotFoundError
    naming it (an empty database would make "no candidates" look like a real answer)."""
    if isinstance(products_db, Engine):
        return products_db
    return open_existing(str(products_db))


def update_variability_stats_for_source(
    products_db: str | Path | Engine,
    source_id: str,
    *,
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR,
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    bin_nights: str = DEFAULT_BIN_NIGHTS,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> bool:
    """Rebuild one source's sums and statistics from its usable photometry (no ``exclude_flags``
    quality bit; window statistics on nightly bins as ``bin_nights`` says; gain-normalized or raw
    fluxes as ``flux_scale`` says); False if it has none."""
    return (
        pipeline.recompute_variability(
            _engine(products_db),
            [source_id],
            flux_scale_error=flux_scale_error,
            dip_window_days=dip_window_days,
            exclude_flags=exclude_flags,
            bin_nights=bin_nights,
            flux_scale=flux_scale,
        )
        > 0
    )


def detect_ese_candidates(
    products_db: str | Path | Engine,
    min_sigma: float | None = None,
    *,
    preset: str | None = None,
    recompute: bool = False,
    source_id: str | None = None,
    use_composite_scoring: bool = False,
    min_dip_sigma: float | None = None,
    min_obs: int | None = None,
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR,
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    bin_nights: str = DEFAULT_BIN_NIGHTS,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> list[dict]:
    """Flag ESE candidates among all sources (or one) and return them, most significant first.

    ``preset`` (conservative 5.0, moderate 3.5, sensitive 3.0) or ``min_sigma`` switches on the
    seed's ``sigma_deviation`` rule (flag_type ``outlier``; off otherwise: one outlying epoch
    fires it) next to the dip rule (``min_dip_sigma``), which always runs. ``recompute`` first
    rebuilds the sums and ``variability_stats`` from ``photometry`` (O(history); the dip statistic
    over the last ``dip_window_days``; fluxes as ``flux_scale`` says: ``normalized`` or ``raw``).
    With ``use_composite_scoring`` each candidate also carries
    the seed's ``composite_score`` and ``confidence``.
    """
    engine = _engine(products_db)
    settings = DetectionSettings(
        min_sigma=resolve_min_sigma(preset, min_sigma),
        min_dip_sigma=DEFAULT_MIN_DIP_SIGMA if min_dip_sigma is None else min_dip_sigma,
        min_obs=DEFAULT_MIN_OBS if min_obs is None else min_obs,
        use_sigma_rule=sigma_rule_requested(preset, min_sigma),
    )
    ids = [source_id] if source_id else None
    if recompute:
        pipeline.recompute_variability(
            engine,
            ids,
            flux_scale_error=flux_scale_error,
            dip_window_days=dip_window_days,
            exclude_flags=exclude_flags,
            bin_nights=bin_nights,
            flux_scale=flux_scale,
        )
    summary = pipeline.detect_candidates(engine, settings, source_ids=ids, run_id=new_run_id("api"))
    return seed_candidate_records(
        engine, summary.flagged, use_composite_scoring=use_composite_scoring
    )


def auto_detect_ese_for_new_measurements(
    products_db: str | Path | Engine, source_id: str, min_sigma: float = DEFAULT_MIN_SIGMA
) -> dict | None:
    """Update one source's statistics and flag it if it qualifies (seed name).

    Returns the candidate, or None when the source is not flagged.
    """
    found = detect_ese_candidates(products_db, min_sigma, recompute=True, source_id=source_id)
    return found[0] if found else None


def plot_lightcurve(
    flux,
    times,
    errors=None,
    config: FigureConfig | None = None,
    title: str | None = None,
    output: str | Path | None = None,
    **kwargs,
) -> Figure:
    """The seed's ``plot_lightcurve(flux, times, errors, config, title, output)``: ``flux``
    (± ``errors``) against ``times`` (astropy ``Time`` or MJD); written to ``output`` (.png/.pdf)
    when given. See :func:`ese_assets.plots.plot_lightcurve`."""
    from ese_assets import plots

    return plots.plot_lightcurve(flux, times, errors, config, title, output, **kwargs)


def plot_eta_v(
    products_db: str | Path | Engine,
    output: str | Path | None = None,
    *,
    config: FigureConfig | None = None,
) -> Figure:
    """The η–V diagram of every source in ``variability_stats`` (log10 ``eta_metric`` against
    log10 ``v_index``), open candidates highlighted; written to ``output`` when given."""
    from ese_assets import plots

    if output is not None:
        plots.check_save_path(output)
    engine = _engine(products_db)
    stats = statistics_db.variability_stats(engine)
    if stats.empty:
        raise ValueError("no variability statistics in the products database yet")
    open_ids = candidates_db.candidates(engine, status=OPEN_STATUSES)["source_id"]
    fig = plots.eta_v_figure(stats, open_ids, config=config)
    if output is not None:
        plots.save_figure(fig, output)
    return fig


@dataclass
class Source:
    """One source's lightcurve and statistics.

    The seed system's ``dsa110_contimg.photometry.source.Source``, with the same attributes.
    """

    source_id: str
    products_db: str | Path | Engine

    @property
    def measurements(self) -> pd.DataFrame:
        """All measurements ordered by observation time (MJD), fluxes also in mJy."""
        lc = photometry_db.lightcurves(_engine(self.products_db), [self.source_id])
        return lc.assign(flux_mjy=lc["peak_jyb"] * 1e3, flux_err_mjy=lc["peak_err_jyb"] * 1e3)

    @property
    def variability(self) -> dict | None:
        stats = statistics_db.variability_stats(
            _engine(self.products_db), source_ids=[self.source_id]
        )
        return {k: py_scalar(v) for k, v in stats.iloc[0].items()} if len(stats) else None

    def plot_lightcurve(
        self,
        use_normalized: bool = False,
        highlight_baseline: bool = True,
        highlight_ese_period: bool = True,
        save: bool = False,
        outfile: str | Path | None = None,
        *,
        exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
        config: FigureConfig | None = None,
        show_template: bool = True,
    ) -> Figure:
        """The lightcurve with its metrics (the seed's ``Source.plot_lightcurve``); the Figure.

        ``use_normalized``: plot ``normalized_flux_jy`` (raw fluxes faint behind); ValueError when
        the photometry has none. ``highlight_baseline``: shade the first 10 usable epochs and draw
        their median. ``highlight_ese_period``: shade the detected event window
        (``dip_start_mjd``..``dip_end_mjd`` of ``variability_stats``), not the whole span.
        ``save`` (or an ``outfile``): write the figure to ``outfile`` (.png, .pdf or .svg by
        extension; default ``<source_id>_lightcurve.png``). ``exclude_flags``: the quality bits
        left out of the statistics (drawn as grey crosses). ``show_template``: when the ESE
        template fit of this source's usable rows (:meth:`template_fit`, on the plotted flux
        scale) finds an event (flag_type ese, dip or spike), draw the fitted model. Raises
        ValueError when the source has no measurements.
        """
        from ese_assets import plots

        engine = _engine(self.products_db)
        if save or outfile is not None:
            outfile = outfile or plots.default_lightcurve_path(self.source_id)
            plots.check_save_path(outfile)  # before reading or drawing anything
        lc = photometry_db.lightcurves(engine, [self.source_id])
        if lc.empty:
            raise ValueError(f"no measurements for source {self.source_id!r}")
        stats = statistics_db.variability_stats(engine, source_ids=[self.source_id])
        found = candidates_db.candidates(engine, source_ids=[self.source_id])
        open_ = found[found["status"].isin(OPEN_STATUSES)]
        template = None
        if show_template:
            fit = self.template_fit(
                exclude_flags=exclude_flags, flux_scale="normalized" if use_normalized else "raw"
            )
            if fit is not None and fit["flag_type"] in EVENT_TYPES:
                mjd = lc["mjd"].to_numpy(dtype=float)
                grid = np.linspace(mjd.min(), mjd.max(), TEMPLATE_GRID_POINTS)
                template = (grid, ese_template.fitted_model_flux(fit, grid))
        fig = plots.lightcurve_figure(
            lc,
            stats.iloc[0].to_dict() if len(stats) else None,
            source_id=self.source_id,
            candidate=(open_ if len(open_) else found).iloc[0].to_dict() if len(found) else None,
            use_normalized=use_normalized,
            highlight_baseline=highlight_baseline,
            highlight_ese_period=highlight_ese_period,
            exclude_flags=exclude_flags,
            config=config,
            template=template,
        )
        if outfile is not None:
            plots.save_figure(fig, outfile)
        return fig

    def template_fit(
        self,
        *,
        exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
        flux_scale: str = DEFAULT_FLUX_SCALE,
        seed: int = 0,
    ) -> dict | None:
        """This source's row of :func:`detect_in_products` (the ESE template fit of its usable
        rows, thresholds calibrated on its own nights and errors), or None when it has no usable
        measurement."""
        found = detect_in_products(
            _engine(self.products_db),
            [self.source_id],
            exclude_flags=exclude_flags,
            flux_scale=flux_scale,
            seed=seed,
        )
        return found.iloc[0].to_dict() if len(found) else None

    def mark(self, status: str, notes: str | None = None, by: str = "user") -> None:
        """Set this source's open candidate to ``investigated`` or ``dismissed``."""
        candidates_db.set_candidate_status(
            _engine(self.products_db), self.source_id, status, notes=notes, by=by
        )

    def calculate_relative_lightcurve(
        self,
        radius_deg: float = DEFAULT_RADIUS_DEG,
        max_eta: float = DEFAULT_MAX_ETA,
        min_neighbors: int = DEFAULT_MIN_NEIGHBORS,
        *,
        max_neighbors: int | None = None,
        exclude_flags: int = RELATIVE_EXCLUDED_FLAGS,
    ) -> RelativeLightcurve:
        """This source's flux divided by an ensemble of its stable neighbours in the same images
        (the seed's method; :mod:`ese_assets.core.relative` states the formulas).

        Neighbours: sources of ``variability_stats`` within ``radius_deg`` (a box in SQL, the
        exact separation in numpy) whose ``eta_metric`` (VAST's eta) is <= ``max_eta``, measured
        in at least half of this source's images, ranked by their weight (median fractional error,
        then separation), the first ``max_neighbors`` (None: all). Raw fluxes (``peak_jyb``): a
        flux-scale error of an image cancels in the ratio, so images with a bad gain are used
        (``exclude_flags`` defaults to the pipeline's exclusions without the bad-gain bit).
        Returns a :class:`~ese_assets.core.relative.RelativeLightcurve`: ``.epochs`` (image_id
        = image path, mjd, flux_jy, flux_err_jy, ensemble, ensemble_err, relative_flux_jy,
        relative_flux_err_jy, n_neighbors; only images where this source and ``min_neighbors``
        neighbours are measured), ``.neighbors`` (rank, source_id, sep_deg, eta, n_epochs,
        median_flux_jy, median_frac_err, weight) and ``.neighbor_ids``. Fewer than
        ``min_neighbors`` stable neighbours: ValueError naming the source and what was found.
        """
        engine = _engine(self.products_db)
        own = photometry_db.source_photometry(engine, [self.source_id], exclude_flags=exclude_flags)
        if own.empty:
            raise ValueError(f"source {self.source_id!r}: no usable measurements")
        # The catalog position, the same in every row of the source.
        ra_deg, dec_deg = float(own["ra_deg"].iloc[-1]), float(own["dec_deg"].iloc[-1])
        cone = cone_db.sources_in_cone(engine, ra_deg, dec_deg, radius_deg)
        cone = cone[cone["source_id"] != self.source_id]
        rows = photometry_db.source_photometry(
            engine, cone["source_id"], exclude_flags=exclude_flags
        )

        def measured(frame: pd.DataFrame) -> pd.DataFrame:
            return frame.rename(
                columns={
                    "image_path": "image_id",
                    "peak_jyb": "flux_jy",
                    "peak_err_jyb": "flux_err_jy",
                }
            )

        return relative_lightcurve(
            measured(own),
            measured(rows),
            cone.rename(columns={"eta_metric": "eta"}),
            radius_deg=radius_deg,
            max_eta=max_eta,
            min_neighbors=min_neighbors,
            max_neighbors=max_neighbors,
            source_id=self.source_id,
        )

"""Python API with the names users of the seed system know.

>>> from ese_assets.api import detect_ese_candidates, Source
>>> candidates = detect_ese_candidates("data/demo/products.sqlite3", preset="conservative")
>>> Source("SIM J100012+300455", products_db="data/demo/products.sqlite3").measurements

``products_db`` is a path to an SQLite file or an SQLAlchemy URL everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine

from ese_assets import pipeline
from ese_assets.core.detection import (
    DEFAULT_MIN_DIP_SIGMA,
    DEFAULT_MIN_OBS,
    DEFAULT_MIN_SIGMA,
    DetectionSettings,
    composite_score,
    resolve_min_sigma,
)
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.values import py_scalar
from ese_assets.core.variability import DEFAULT_DIP_WINDOW_DAYS, DEFAULT_FLUX_SCALE_ERROR
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import ensure_schema, make_engine

#: Fields of one candidate in ``detect_ese_candidates`` output (the seed's JSON fields).
CANDIDATE_FIELDS = (
    "source_id",
    "ra_deg",
    "dec_deg",
    "significance",
    "nvss_flux_mjy",
    "mean_flux_mjy",
    "std_flux_mjy",
    "chi2_nu",
    "n_obs",
    "last_mjd",
    "flag_type",
)


def _engine(products_db: str | Path | Engine) -> Engine:
    if isinstance(products_db, Engine):
        return products_db
    engine = make_engine(str(products_db))
    ensure_schema(engine)
    return engine


def update_variability_stats_for_source(
    products_db: str | Path | Engine,
    source_id: str,
    *,
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR,
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
) -> bool:
    """Rebuild one source's sums and statistics from its usable photometry (no ``exclude_flags``
    quality bit); False if it has none."""
    return (
        pipeline.recompute_variability(
            _engine(products_db),
            [source_id],
            flux_scale_error=flux_scale_error,
            dip_window_days=dip_window_days,
            exclude_flags=exclude_flags,
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
) -> list[dict]:
    """Flag ESE candidates among all sources (or one) and return them, most significant first.

    ``preset`` (conservative 5.0, moderate 3.5, sensitive 3.0) or ``min_sigma`` sets the seed's
    ``sigma_deviation`` rule; the dip rule (``min_dip_sigma``) runs next to it. ``recompute`` first
    rebuilds the sums and ``variability_stats`` from ``photometry`` (O(history); the dip statistic
    over the last ``dip_window_days``). With ``use_composite_scoring`` each candidate also carries
    the seed's ``composite_score`` and ``confidence``.
    """
    engine = _engine(products_db)
    settings = DetectionSettings(
        min_sigma=resolve_min_sigma(preset, min_sigma),
        min_dip_sigma=DEFAULT_MIN_DIP_SIGMA if min_dip_sigma is None else min_dip_sigma,
        min_obs=DEFAULT_MIN_OBS if min_obs is None else min_obs,
    )
    ids = [source_id] if source_id else None
    if recompute:
        pipeline.recompute_variability(
            engine,
            ids,
            flux_scale_error=flux_scale_error,
            dip_window_days=dip_window_days,
            exclude_flags=exclude_flags,
        )
    summary = pipeline.detect_candidates(engine, settings, source_ids=ids)
    if summary.flagged.empty:
        return []
    stats = statistics_db.variability_stats(
        engine, source_ids=summary.flagged["source_id"].tolist()
    )
    merged = summary.flagged.merge(stats, on="source_id", how="left", suffixes=("", "_stats"))
    merged = merged.sort_values("significance", ascending=False)
    out = []
    for row in merged.to_dict("records"):
        item = {k: py_scalar(row.get(k)) for k in CANDIDATE_FIELDS}
        item["sigma_deviation"] = py_scalar(row.get("sigma_deviation"))
        item["dip_significance"] = py_scalar(row.get("dip_significance"))
        if use_composite_scoring:
            score, confidence = composite_score(
                row.get("sigma_deviation"), row.get("chi2_nu"), row.get("eta_metric")
            )
            item["composite_score"] = py_scalar(score)
            item["confidence"] = py_scalar(confidence)
        out.append(item)
    return out


def auto_detect_ese_for_new_measurements(
    products_db: str | Path | Engine, source_id: str, min_sigma: float = DEFAULT_MIN_SIGMA
) -> dict | None:
    """Update one source's statistics and flag it if it qualifies (seed name).

    Returns the candidate, or None when the source is not flagged.
    """
    found = detect_ese_candidates(products_db, min_sigma, recompute=True, source_id=source_id)
    return found[0] if found else None


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

    def mark(self, status: str, notes: str | None = None, by: str = "user") -> None:
        """Set this source's open candidate to ``investigated`` or ``dismissed``."""
        candidates_db.set_candidate_status(
            _engine(self.products_db), self.source_id, status, notes=notes, by=by
        )

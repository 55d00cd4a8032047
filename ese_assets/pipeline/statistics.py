"""Variability statistics of the sources measured in some nights, in one transaction.

Additive per-night sums give the whole-history moments, a trailing window the dip statistic, so a
night costs the same whatever the length of the history; :func:`recompute_variability` rebuilds
them from the whole history on demand. The window statistics run on nightly bins (one weighted
mean per source and night, from the same sums; ``bin_nights``, :mod:`ese_assets.core.binning`,
which also says what binning loses), so a night also costs the same whatever the cadence: at most
one row per source and night of the window is read. Raw epochs of the window are read only for
sources left unbinned: all with ``bin_nights="off"``; with ``"auto"`` those whose window holds at
most ~365 epochs or one epoch a night (as cheap as their bins, and exact).

Only usable measurements enter the statistics: photometry rows whose ``quality_flag`` has none of
the ``exclude_flags`` bits (default ``core.quality.DEFAULT_EXCLUDED_FLAGS``: blank and edge
positions, which have no flux) are read, summed and counted; the others stay in ``photometry``
for people to see, and are never read here (the filter is in the SQL of the storage reads).

Fluxes: ``flux_scale="normalized"`` (default, ``ESE_FLUX_SCALE``) sums each row's gain-normalized
flux and error (``photometry.normalized_flux_jy``, written by the calibration step of the same
night, :mod:`ese_assets.pipeline.calibration`), so a night's sums are always of one consistent
calibration of that night; rows of images whose gain is bad carry ``FLAG_BAD_GAIN``, excluded by
the default mask. ``"raw"`` sums ``peak_jyb``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine

from ese_assets.core.binning import (
    BIN_COLUMNS,
    BIN_SUMS_COLUMNS,
    DEFAULT_BIN_NIGHTS,
    binned_window_metrics,
    night_bins,
    sources_to_bin,
    validate_bin_nights,
)
from ese_assets.core.calibration import DEFAULT_FLUX_SCALE, validate_flux_scale
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, usable_measurement
from ese_assets.core.sums import (
    COUNT_COLUMNS,
    EXTREME_COLUMNS,
    LATER_SUM_COLUMNS,
    SUM_COLUMNS,
    combine_partial_sums,
    metrics_from_sums,
    night_partial_sums,
)
from ese_assets.core.variability import (
    DEFAULT_DIP_WINDOW_DAYS,
    METRIC_COLUMNS,
    WINDOW_COLUMNS,
    variability_metrics,
)
from ese_assets.pipeline.progress import Progress, silent
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db

log = logging.getLogger(__name__)

#
# variability_stats holds two kinds of statistics (see README "Tables"):
#
# * whole-history moments (n_obs, mean, std, min/max, weighted mean, chi2_nu, eta, V,
#   sigma_deviation, first/last mjd) from additive sums: one source_night_sums row per source and
#   night, one source_sums row per source (core.sums.night_partial_sums, metrics_from_sums);
# * the robust baseline and the dip statistic (median, robust std, dip_*) from a trailing window
#   of ``dip_window_days`` ending at the source's latest epoch: order statistics and a time-ordered
#   scan cannot come from sums, and an ESE (14-180 days) fits in a year. They run on the nightly
#   bins of the window (source_night_sums rows, core.binning) or, for unbinned sources, on the
#   window's epochs.
#
# A night therefore costs its own photometry rows, one sums row per source and at most one night
# row per source and night of the window, whatever the length of the history and the cadence.
# recompute_variability is the O(history) rebuild, on demand.

#: Columns of variability_stats that are not metrics: catalog values and processing times.
_STATS_EXTRA_COLUMNS = ("ra_deg", "dec_deg", "nvss_flux_mjy", "last_measured_at")


def _flux_table(rows: pd.DataFrame, flux_scale: str = DEFAULT_FLUX_SCALE) -> pd.DataFrame:
    """Photometry rows as the measurement table of core.variability (Jy/beam -> mJy).

    ``flux_scale="normalized"``: the gain-normalized flux and error (core.calibration); a row not
    calibrated yet (NULL there: measured before calibration existed, or its night's calibration
    has not run) counts with its raw values, i.e. gain 1. ``"raw"``: the measured peak fluxes.
    """
    flux = rows["peak_jyb"].to_numpy(float)
    err = rows["peak_err_jyb"].to_numpy(float)
    if validate_flux_scale(flux_scale) == "normalized" and "normalized_flux_jy" in rows.columns:
        norm = rows["normalized_flux_jy"].to_numpy(float, na_value=np.nan)
        norm_err = rows["normalized_flux_err_jy"].to_numpy(float, na_value=np.nan)
        calibrated = np.isfinite(norm)
        flux = np.where(calibrated, norm, flux)
        err = np.where(calibrated, norm_err, err)
    out = pd.DataFrame(
        {
            "source_id": rows["source_id"].to_numpy(),
            "mjd": rows["mjd"].to_numpy(float),
            "flux_mjy": flux * 1e3,
            "flux_err_mjy": err * 1e3,
        }
    )
    if "night" in rows.columns:
        out["night"] = rows["night"].to_numpy()
    return out


def _latest_catalog_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Per source (index): catalog position and flux of its latest row, last measured_at."""
    return (
        rows.sort_values(["source_id", "mjd"], kind="mergesort")
        .groupby("source_id", sort=True)
        .agg(
            ra_deg=("ra_deg", "last"),
            dec_deg=("dec_deg", "last"),
            nvss_flux_mjy=("nvss_flux_mjy", "last"),
            last_measured_at=("measured_at", "max"),
        )
    )


def _catalog_shifts(rows: pd.DataFrame) -> pd.Series:
    """Shift c of each source's sums: its catalog flux (0 when unknown).

    Why the catalog flux: it is known before the first epoch and close to the mean of nearly every
    source, so sums of d = f - c keep their precision (core.sums, "Precision"),
    and it stays the same for ever, so sums of different nights add.
    """
    flux = _latest_catalog_values(rows)["nvss_flux_mjy"]
    return flux.where(np.isfinite(flux), 0.0).astype(float)


def _night_sums_of_rows(
    rows: pd.DataFrame, shifts: pd.Series, *, flux_scale_error: float, flux_scale: str
) -> pd.DataFrame:
    """``source_night_sums`` rows of photometry rows (each source shifted by ``shifts[source]``)."""
    table = _flux_table(rows, flux_scale)
    table["shift_mjy"] = shifts.reindex(table["source_id"]).to_numpy(float)
    sums = night_partial_sums(table, flux_scale_error=flux_scale_error)
    measured = rows.groupby(["source_id", "night"], sort=True)["measured_at"].max()
    sums["last_measured_at"] = measured.reindex(
        pd.MultiIndex.from_frame(sums[["source_id", "night"]])
    ).to_numpy(float)
    sums["flux_scale_error"] = float(flux_scale_error)
    return sums


def _rebuild_sums(
    conn,
    source_ids: Sequence[str],
    *,
    flux_scale_error: float,
    exclude_flags: int,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> None:
    """Rebuild the night rows and the total of ``source_ids`` from their whole photometry history.

    O(history): used on demand (recompute) and when the stored sums cannot be updated (a new
    flux_scale_error, or a source with history older than its sums, e.g. after an upgrade).
    """
    rows = photometry_db.source_photometry(conn, source_ids, exclude_flags=exclude_flags)
    nights = _night_sums_of_rows(
        rows, _catalog_shifts(rows), flux_scale_error=flux_scale_error, flux_scale=flux_scale
    )
    statistics_db.replace_night_sums(conn, nights, source_ids=source_ids)
    # Sources left without usable photometry have no sums.
    statistics_db.delete_source_sums(conn, source_ids)
    if len(nights):
        totals = combine_partial_sums(nights)
        totals = totals.join(_latest_catalog_values(rows), on="source_id")
        totals["flux_scale_error"] = float(flux_scale_error)
        statistics_db.put_source_sums(conn, totals)


def _sources_to_rebuild(
    conn, rows: pd.DataFrame, stored: pd.DataFrame, *, flux_scale_error: float, exclude_flags: int
) -> list[str]:
    """Sources whose stored sums cannot take a difference: a different flux_scale_error (other
    weights), sums written before a column of LATER_SUM_COLUMNS existed (NULL there), or no sums
    yet although photometry exists outside these rows."""
    stale = set(stored.loc[stored["flux_scale_error"] != float(flux_scale_error), "source_id"])
    later = [c for c in LATER_SUM_COLUMNS if c in stored.columns]
    if later:
        stale.update(stored.loc[stored[later].isna().any(axis=1), "source_id"])
    new = sorted(set(rows["source_id"]) - set(stored["source_id"]))
    if new:
        in_rows = rows.groupby("source_id").size()
        in_table = photometry_db.photometry_counts_by_source(conn, new, exclude_flags=exclude_flags)
        stale.update(s for s in new if in_table.get(s, 0) > in_rows[s])
    return sorted(stale)


def _apply_night_changes(
    conn,
    nights: list[str],
    rows: pd.DataFrame,
    old: pd.DataFrame,
    stored: pd.DataFrame,
    *,
    flux_scale_error: float,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> None:
    """Steps (b)-(d) of :func:`update_variability`: new night sums, difference to the stored ones
    added to ``source_sums``, night rows replaced. The caller's transaction makes them atomic."""
    shifts = _catalog_shifts(rows)
    known = stored.set_index("source_id")["shift_mjy"]
    shifts.update(known)  # a source keeps its shift for ever: its sums must keep adding
    new = _night_sums_of_rows(
        rows, shifts, flux_scale_error=flux_scale_error, flux_scale=flux_scale
    )

    keys = ["source_id", "night"]
    both = new.merge(
        old[keys + list(SUM_COLUMNS) + list(EXTREME_COLUMNS)],
        on=keys,
        how="outer",
        suffixes=("", "_old"),
        indicator=True,
        sort=True,
    )
    # new - old: exactly 0 when a night is re-run on unchanged photometry, so re-runs leave
    # source_sums bit-identical. A pair that vanished (a source no longer measured) subtracts.
    delta = both[keys + list(EXTREME_COLUMNS)].copy()
    for col in SUM_COLUMNS:
        delta[col] = both[col].fillna(0) - both[f"{col}_old"].fillna(0)
    for col in COUNT_COLUMNS:
        delta[col] = delta[col].astype(np.int64)
    totals = combine_partial_sums(delta)
    catalog = _latest_catalog_values(rows)
    stored_catalog = stored.set_index("source_id")[list(_STATS_EXTRA_COLUMNS)]
    totals = totals.join(catalog.combine_first(stored_catalog), on="source_id")
    totals["shift_mjy"] = shifts.combine_first(known).reindex(totals["source_id"]).to_numpy()
    totals["flux_scale_error"] = float(flux_scale_error)

    # A stored minimum (maximum...) cannot be taken back by arithmetic: sources one of whose night
    # extremes changed or vanished get theirs re-aggregated from their night rows (rare).
    had_old = both["_merge"] != "left_only"
    differs = both["_merge"] == "right_only"
    for col in EXTREME_COLUMNS:
        differs |= both[col] != both[f"{col}_old"]
    refresh = sorted(set(both.loc[had_old & differs, "source_id"]))

    statistics_db.add_source_sums(conn, totals)
    statistics_db.replace_night_sums(conn, new, nights=nights)
    if refresh:
        statistics_db.refresh_source_extremes(conn, refresh)
    statistics_db.delete_source_sums(conn, totals["source_id"], only_empty=True)


def _window_stats(
    conn,
    source_ids: Sequence[str],
    *,
    flux_scale_error: float,
    dip_window_days: float,
    exclude_flags: int,
    bin_nights: str,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> pd.DataFrame:
    """Median, robust std and dip statistic (WINDOW_COLUMNS) of ``source_ids`` over their trailing
    window: from the window's nightly bins for the sources ``bin_nights`` bins
    (core.binning.sources_to_bin), from the window's epochs for the others."""
    parts = []
    raw_ids = list(source_ids)
    if bin_nights != "off":
        bins = night_bins(
            statistics_db.window_night_sums(
                conn, source_ids, dip_window_days, columns=BIN_SUMS_COLUMNS
            )
        )
        binned = sources_to_bin(bins, bin_nights)
        if len(binned):
            parts.append(binned_window_metrics(bins[bins["source_id"].isin(binned)]))
            raw_ids = sorted(set(raw_ids) - set(binned))
    if raw_ids:
        window = _flux_table(
            photometry_db.window_photometry(
                conn, raw_ids, dip_window_days, exclude_flags=exclude_flags
            ),
            flux_scale,
        )
        parts.append(
            variability_metrics(window, flux_scale_error=flux_scale_error)[list(WINDOW_COLUMNS)]
        )
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _store_stats(
    conn,
    source_ids: Sequence[str],
    *,
    flux_scale_error: float,
    dip_window_days: float,
    exclude_flags: int,
    bin_nights: str,
    now: float,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> pd.DataFrame:
    """Steps (e)-(g): variability_stats of ``source_ids`` from their sums and their window."""
    sums = statistics_db.source_sums(conn, source_ids)
    if sums.empty:
        return pd.DataFrame()
    moments = metrics_from_sums(sums)
    robust = _window_stats(
        conn,
        sums["source_id"].tolist(),
        flux_scale_error=flux_scale_error,
        dip_window_days=dip_window_days,
        exclude_flags=exclude_flags,
        bin_nights=bin_nights,
        flux_scale=flux_scale,
    )
    stats = moments.merge(robust, on="source_id", how="left").merge(
        sums[["source_id", *_STATS_EXTRA_COLUMNS]], on="source_id", how="left"
    )
    stats = stats[[*METRIC_COLUMNS, *_STATS_EXTRA_COLUMNS]]
    stats["updated_at"] = now
    statistics_db.upsert_variability_stats(conn, stats)
    return stats


def stats_from_lightcurves(
    lightcurves: pd.DataFrame,
    *,
    flux_scale_error: float,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    now: float | None = None,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> pd.DataFrame:
    """``variability_stats`` rows computed directly from whole photometry histories (Jy/beam rows).

    The reference the incremental path is tested against (every metric over every usable epoch,
    no window); the pipeline itself uses :func:`update_variability` / :func:`recompute_variability`.
    Rows whose ``quality_flag`` (when present) has an ``exclude_flags`` bit, or without a flux,
    are left out as in the pipeline.
    """
    now = time.time() if now is None else now
    usable = lightcurves["peak_jyb"].notna().to_numpy(copy=True)
    if "quality_flag" in lightcurves.columns:
        usable &= usable_measurement(lightcurves["quality_flag"].to_numpy(), exclude_flags)
    lightcurves = lightcurves[usable]
    if lightcurves.empty:
        return pd.DataFrame()
    stats = variability_metrics(
        _flux_table(lightcurves, flux_scale), flux_scale_error=flux_scale_error
    )
    stats = stats.merge(
        _latest_catalog_values(lightcurves), left_on="source_id", right_index=True, how="left"
    )
    stats["updated_at"] = now
    return stats


def update_variability(
    engine: Engine,
    nights: Sequence[str],
    *,
    flux_scale_error: float,
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    bin_nights: str = DEFAULT_BIN_NIGHTS,
    now: float | None = None,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> pd.DataFrame:
    """Update the statistics of every source measured in ``nights``, at a cost bounded by the
    nights, the sources and the dip window -- not by the length of the history.

    In ONE transaction (:func:`storage.statistics.sums_transaction`): (a) read the photometry of
    the nights' images only; (b) their per-(source, night) partial sums; (c) the stored night rows
    of those nights; (d) add new - old to ``source_sums`` and replace the night rows; (e) the
    whole-history moments from ``source_sums``; (f) median, robust std and dip statistic over each
    source's last ``dip_window_days``, on its nightly bins (``bin_nights``: ``auto``, ``on`` or
    ``off``, see :func:`ese_assets.core.binning.sources_to_bin`); (g) upsert
    ``variability_stats``. Sources whose sums cannot be updated (another ``flux_scale_error``, or
    history without sums) are rebuilt from their whole history instead. A killed run leaves the
    previous state; a re-run on unchanged photometry leaves every table identical. Only usable
    photometry rows (no ``exclude_flags`` bit) are read. The stored sums do not record the mask:
    after changing it, rebuild with :func:`recompute_variability`. ``flux_scale``: the
    gain-normalized fluxes (default; bad images are left out by the ``FLAG_BAD_GAIN`` bit of the
    default mask) or the raw ones (:func:`_flux_table`); the sums do not record it either, so
    after changing it rebuild too. Returns the rows written to ``variability_stats``.
    """
    now = time.time() if now is None else now
    bin_nights = validate_bin_nights(bin_nights)
    flux_scale = validate_flux_scale(flux_scale)
    nights = sorted({str(n) for n in nights})
    with statistics_db.sums_transaction(engine) as conn:
        rows = photometry_db.night_photometry(conn, nights, exclude_flags=exclude_flags)
        old = statistics_db.night_sums(conn, nights=nights)
        touched = sorted(set(rows["source_id"]) | set(old["source_id"]))
        stored = statistics_db.source_sums(conn, touched)
        rebuild = _sources_to_rebuild(
            conn, rows, stored, flux_scale_error=flux_scale_error, exclude_flags=exclude_flags
        )
        if rebuild:
            log.info("rebuilding the sums of %d sources from their whole history", len(rebuild))
            rows, old, stored = (df[~df["source_id"].isin(rebuild)] for df in (rows, old, stored))
        if len(rows) or len(old):
            _apply_night_changes(
                conn,
                nights,
                rows,
                old,
                stored,
                flux_scale_error=flux_scale_error,
                flux_scale=flux_scale,
            )
        if rebuild:  # after the night rows of `nights` were replaced: this rewrites all of theirs
            _rebuild_sums(
                conn,
                rebuild,
                flux_scale_error=flux_scale_error,
                exclude_flags=exclude_flags,
                flux_scale=flux_scale,
            )
        return _store_stats(
            conn,
            touched,
            flux_scale_error=flux_scale_error,
            dip_window_days=dip_window_days,
            exclude_flags=exclude_flags,
            bin_nights=bin_nights,
            now=now,
            flux_scale=flux_scale,
        )


def recompute_variability(
    engine: Engine,
    source_ids: Sequence[str] | None = None,
    *,
    flux_scale_error: float,
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    bin_nights: str = DEFAULT_BIN_NIGHTS,
    chunk: int = 2000,
    progress: Progress = silent,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> int:
    """Rebuild sums and statistics of ``source_ids`` (all sources when None) from ``photometry``.

    The full O(history) path (``ese detect --recompute``, the API): per chunk of sources, one
    transaction rewrites their ``source_night_sums`` and ``source_sums`` rows from their whole
    history (usable rows only, see ``exclude_flags``), then their ``variability_stats`` (window
    statistics binned as ``bin_nights`` says, as in :func:`update_variability`). Returns the number
    of sources with statistics. ``flux_scale`` as in :func:`update_variability`.
    """
    bin_nights = validate_bin_nights(bin_nights)
    flux_scale = validate_flux_scale(flux_scale)
    if source_ids is None:
        ids = sorted(
            set(photometry_db.measured_source_ids(engine))
            | set(statistics_db.source_sums(engine)["source_id"])
        )
    else:
        ids = sorted({str(s) for s in source_ids})
    done = 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        with statistics_db.sums_transaction(engine) as conn:
            _rebuild_sums(
                conn,
                part,
                flux_scale_error=flux_scale_error,
                exclude_flags=exclude_flags,
                flux_scale=flux_scale,
            )
            stats = _store_stats(
                conn,
                part,
                flux_scale_error=flux_scale_error,
                dip_window_days=dip_window_days,
                exclude_flags=exclude_flags,
                bin_nights=bin_nights,
                now=time.time(),
                flux_scale=flux_scale,
            )
        done += len(stats)
        progress(f"variability statistics: {min(start + chunk, len(ids))}/{len(ids)} sources")
    return done


def nightly_lightcurves(
    bind: Engine | Connection,
    source_ids: Sequence[str],
    *,
    window_days: float | None = None,
) -> pd.DataFrame:
    """Nightly-binned lightcurves of ``source_ids`` from the stored night sums: one row per source
    and night (:data:`ese_assets.core.binning.BIN_COLUMNS`: weighted mean ``flux_mjy``, its
    ``flux_err_mjy``, ``n_epochs``, the night's ``first_mjd``/``last_mjd`` and within-night
    scatter), sorted by source_id and time.

    The whole history, or with ``window_days`` each source's trailing window (the rows the
    statistics stage reads). What detection scans instead of raw epochs; raw epochs are for plots
    and exports (:func:`ese_assets.storage.photometry.lightcurves`).
    """
    if window_days is None:
        rows = statistics_db.night_sums(bind, source_ids=source_ids)
    else:
        rows = statistics_db.window_night_sums(bind, source_ids, window_days)
    return night_bins(rows)[list(BIN_COLUMNS)]

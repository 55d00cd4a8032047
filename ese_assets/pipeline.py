"""Units of work that join the science core to the products database.

Dagster assets, the sensor, the CLI and the Python API all call these functions, so the same code
path serves every interface. Nothing here imports Dagster.

Units and their transactions:

* :func:`scan_directory` registers new files in ``images`` (usable ones ``pending``, the rest
  ``rejected`` with a reason). It reads only FITS headers.
* :func:`measure_images` measures each image in one transaction (its photometry rows are replaced
  and its ``images`` row marked ``measured``), so a run killed half-way leaves whole images only.
* :func:`update_variability` updates the statistics of every source measured in some nights in one
  transaction: additive per-night sums give the whole-history moments, a trailing window the dip
  statistic, so the cost does not grow with the history. :func:`recompute_variability` rebuilds
  them from the whole history on demand.
* :func:`detect_candidates` applies the detection rules and the candidate workflow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.catalog import Catalog
from ese_assets.core.detection import DetectionSettings, flag_candidates, plan_candidate_changes
from ese_assets.core.fits_image import ImageError, ImageInfo, load_image, read_image_info
from ese_assets.core.nights import night_of_mjd
from ese_assets.core.photometry import forced_photometry
from ese_assets.core.variability import (
    DEFAULT_DIP_WINDOW_DAYS,
    EXTREME_COLUMNS,
    METRIC_COLUMNS,
    SUM_COLUMNS,
    WINDOW_COLUMNS,
    combine_partial_sums,
    metrics_from_sums,
    night_partial_sums,
    variability_metrics,
)
from ese_assets.storage import repository as repo

log = logging.getLogger(__name__)

#: Files with these endings are partial copies by convention (rsync, browsers, editors): never
#: inspected, so a transfer in progress is not rejected.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".lock", ".filepart")

#: Two registrations closer than this in time (days) and pointing (degrees) are the same observation.
DUPLICATE_MJD_TOL_DAYS = 1.0 / 86400.0
DUPLICATE_POINTING_TOL_DEG = 1.0 / 3600.0

#: New files whose headers are read and registered per transaction.
REGISTER_BATCH = 500

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    return None


# --------------------------------------------------------------------------- registration


@dataclass
class ScanResult:
    """Outcome of looking at a directory (or an explicit list of files)."""

    registered: list[str] = field(default_factory=list)  # new usable images, status pending
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    waiting: list[str] = field(default_factory=list)  # still being written; looked at next time
    already_known: int = 0
    deferred: int = 0  # new files left for the next call (``limit``)


def _candidate_files(directory: Path) -> list[os.DirEntry]:
    """Regular, visible files of ``directory`` (not recursive), partial-transfer names excluded."""
    if not directory.is_dir():
        raise FileNotFoundError(f"incoming directory {directory} does not exist")
    with os.scandir(directory) as entries:
        return sorted(
            (e for e in entries
             if e.is_file(follow_symlinks=True) and not e.name.startswith(".")
             and not e.name.lower().endswith(PARTIAL_SUFFIXES)),
            key=lambda e: e.name,
        )


def _image_record(info: ImageInfo, *, night: str, size: int, mtime: float, now: float) -> dict:
    return {
        "path": info.path, "night": night, "mjd": info.mjd, "date_obs": info.date_obs,
        "beam_maj_deg": info.beam.major_deg, "beam_min_deg": info.beam.minor_deg,
        "beam_pa_deg": info.beam.pa_deg, "freq_hz": info.freq_hz,
        "ra_center_deg": info.center_ra_deg, "dec_center_deg": info.center_dec_deg,
        "radius_deg": info.radius_deg, "naxis1": info.shape[1], "naxis2": info.shape[0],
        "status": "pending", "reason": None, "file_size": size, "file_mtime": mtime,
        "registered_at": now,
    }


def _rejected_record(path: str, reason: str, *, size: int | None, mtime: float | None,
                     now: float, night: str | None = None, mjd: float | None = None) -> dict:
    return {"path": path, "night": night, "mjd": mjd, "status": "rejected", "reason": reason,
            "file_size": size, "file_mtime": mtime, "registered_at": now}


def _is_duplicate(rec: dict, others: pd.DataFrame) -> str | None:
    """Path of an already registered image with the same observation time and pointing, if any."""
    if others.empty:
        return None
    dra = (others["ra_center_deg"] - rec["ra_center_deg"] + 180.0) % 360.0 - 180.0
    same = ((others["mjd"] - rec["mjd"]).abs() < DUPLICATE_MJD_TOL_DAYS) \
        & ((dra * np.cos(np.radians(rec["dec_center_deg"]))).abs() < DUPLICATE_POINTING_TOL_DEG) \
        & ((others["dec_center_deg"] - rec["dec_center_deg"]).abs() < DUPLICATE_POINTING_TOL_DEG) \
        & (others["path"] != rec["path"])
    hits = others.loc[same, "path"]
    return str(hits.iloc[0]) if len(hits) else None


def inspect_files(
    engine: Engine,
    paths: Iterable[str],
    *,
    timezone: str,
    first_night: str,
    settle_seconds: float = 0.0,
    now: float | None = None,
    limit: int | None = None,
    progress: Progress = _silent,
) -> ScanResult:
    """Register the given files in ``images``: usable images as ``pending``, others ``rejected``.

    Files already in ``images`` are left alone, except rejected files whose size or modification
    time changed since (they are examined again). A file modified less than ``settle_seconds`` ago is
    still being written and is left for the next look. A file is rejected (with a reason that names
    the file and the problem) when it is not a readable FITS image with WCS, beam and time, when its
    night precedes ``first_night`` (the first partition), or when it duplicates an image already
    registered (same observation time and pointing, e.g. the same file copied under another name).

    Headers are read and registered in batches of :data:`REGISTER_BATCH` files, each batch in one
    transaction, so a large backlog makes steady progress. ``limit`` caps the new files examined in
    this call (the sensor's tick must stay short); the rest are counted in ``result.deferred``.
    """
    now = time.time() if now is None else now
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    _release_rewritten_rejections(engine, paths)
    known = repo.known_image_paths(engine, paths)
    result = ScanResult(already_known=len(known))
    new = [p for p in paths if p not in known]
    if limit is not None and len(new) > limit:
        result.deferred = len(new) - limit
        new = new[:limit]
    for start in range(0, len(new), REGISTER_BATCH):
        _register_batch(engine, new[start:start + REGISTER_BATCH], result, timezone=timezone,
                        first_night=first_night, settle_seconds=settle_seconds, now=now,
                        progress=progress)
        if len(new) > REGISTER_BATCH:
            progress(f"examined {min(start + REGISTER_BATCH, len(new))}/{len(new)} new files")
    return result


def _register_batch(engine: Engine, paths: list[str], result: ScanResult, *, timezone: str,
                    first_night: str, settle_seconds: float, now: float,
                    progress: Progress) -> None:
    records: list[dict] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue  # vanished between listing and inspection: nothing to register
        if now - stat.st_mtime < settle_seconds:
            result.waiting.append(path)
            continue
        records.append(_inspect_one(path, stat, timezone=timezone, first_night=first_night, now=now))
    _reject_duplicates(engine, [r for r in records if r["status"] == "pending"])
    repo.register_images(engine, records)
    for rec in records:
        if rec["status"] == "pending":
            result.registered.append(rec["path"])
        else:
            result.rejected.append((rec["path"], rec["reason"]))
            log.warning("rejected %s: %s", rec["path"], rec["reason"])
            progress(f"rejected {rec['path']}: {rec['reason']}")


def _reject_duplicates(engine: Engine, usable: list[dict]) -> None:
    """Mark records that repeat an observation already registered (or earlier in ``usable``)."""
    if not usable:
        return
    mjds = [r["mjd"] for r in usable]
    registered = repo.images_near_mjd(engine, min(mjds) - DUPLICATE_MJD_TOL_DAYS,
                                      max(mjds) + DUPLICATE_MJD_TOL_DAYS)
    accepted: list[dict] = []  # duplicates may also arrive together in one batch
    for rec in usable:
        twin = _is_duplicate(rec, registered) or _is_duplicate(rec, pd.DataFrame(accepted))
        if twin is None:
            accepted.append(rec)
        else:
            rec.update(status="rejected",
                       reason=f"duplicate of {twin} (same observation time and pointing)")


def _release_rewritten_rejections(engine: Engine, paths: list[str]) -> None:
    """Forget rejections of files that changed since (e.g. a transfer that stalled past the settle
    time and then completed), so they are examined again instead of staying rejected forever."""
    changed = []
    for path, (size, mtime) in repo.rejected_file_states(engine, paths).items():
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        if size != stat.st_size or mtime is None or abs(mtime - stat.st_mtime) > 1e-6:
            changed.append(path)
    if changed:
        repo.forget_rejected_images(engine, changed)
        log.info("re-examining %d rejected files that changed: %s", len(changed), changed[:5])


def _inspect_one(path: str, stat: os.stat_result, *, timezone: str, first_night: str,
                 now: float) -> dict:
    try:
        info = read_image_info(path)
    except ImageError as exc:
        return _rejected_record(path, exc.reason, size=stat.st_size, mtime=stat.st_mtime, now=now)
    except OSError as exc:  # permissions and the like: record, never stop the scan
        return _rejected_record(path, f"cannot read file ({exc})", size=stat.st_size,
                                mtime=stat.st_mtime, now=now)
    night = night_of_mjd(info.mjd, timezone)
    if night < first_night:
        return _rejected_record(
            path, f"observation night {night} precedes the first partition {first_night} "
                  f"(set ESE_PARTITION_START)", size=stat.st_size, mtime=stat.st_mtime,
            now=now, night=night, mjd=info.mjd)
    return _image_record(info, night=night, size=stat.st_size, mtime=stat.st_mtime, now=now)


def scan_directory(engine: Engine, directory: str | Path, **kwargs) -> ScanResult:
    """:func:`inspect_files` over the files of ``directory`` (see there for the rules)."""
    entries = _candidate_files(Path(directory).expanduser().resolve())
    return inspect_files(engine, [e.path for e in entries], **kwargs)


# --------------------------------------------------------------------------- photometry


@dataclass
class ImageResult:
    path: str
    status: str  # measured | rejected | failed
    n_sources: int = 0
    median_rms_jyb: float | None = None
    reason: str | None = None
    n_flagged: int = 0


def measure_image(engine: Engine, catalog: Catalog, path: str, *, min_flux_mjy: float = 0.0,
                  now: float | None = None) -> ImageResult:
    """Forced photometry of every catalog source in one image, stored in one transaction.

    The file is read once. Unusable data (e.g. an all-NaN image, a file that became corrupt after
    registration) marks the image ``rejected``; unexpected errors mark it ``failed`` so the nightly
    run retries it. Either way the error is recorded and the caller moves on to the next image.
    """
    now = time.time() if now is None else now
    try:
        image = load_image(path)
    except ImageError as exc:
        repo.set_image_status(engine, [path], "rejected", reason=exc.reason)
        return ImageResult(path, "rejected", reason=exc.reason)
    except OSError as exc:
        reason = f"cannot read file ({exc})"
        repo.mark_image_failed(engine, path, reason)
        return ImageResult(path, "failed", reason=reason)

    info = image.info
    idx = catalog.select_in_footprint(info.wcs, info.shape, min_flux_mjy=min_flux_mjy)
    phot = forced_photometry(image.data, info.wcs, info.beam,
                             catalog.ra_deg[idx], catalog.dec_deg[idx])
    good = np.isfinite(phot.peak_jyb) & np.isfinite(phot.peak_err_jyb) & (phot.peak_err_jyb > 0)
    rows = pd.DataFrame({
        "image_path": path,
        "ra_deg": catalog.ra_deg[idx][good],
        "dec_deg": catalog.dec_deg[idx][good],
        "nvss_flux_mjy": catalog.flux_mjy[idx][good],
        "peak_jyb": phot.peak_jyb[good],
        "peak_err_jyb": phot.peak_err_jyb[good],
        "measured_at": now,
        "source_id": catalog.source_id[idx][good],
        "mjd": info.mjd,
        "local_rms_jyb": phot.local_rms_jyb[good],
        "background_jyb": phot.background_jyb[good],
        "quality_flag": phot.quality_flag[good].astype(int),
    })
    rms = phot.local_rms_jyb[good]
    median_rms = float(np.median(rms)) if rms.size else None
    repo.replace_image_photometry(engine, path, rows, {
        "mjd": info.mjd, "median_rms_jyb": median_rms, "n_sources": int(good.sum()),
    })
    return ImageResult(path, "measured", n_sources=int(good.sum()), median_rms_jyb=median_rms,
                       n_flagged=int((phot.quality_flag[good] != 0).sum()))


def measure_images(engine: Engine, catalog: Catalog, paths: Sequence[str], *,
                   min_flux_mjy: float = 0.0, progress: Progress = _silent) -> list[ImageResult]:
    """:func:`measure_image` for each path; one bad image never stops the others."""
    results = []
    for i, path in enumerate(paths, start=1):
        try:
            res = measure_image(engine, catalog, path, min_flux_mjy=min_flux_mjy)
        except Exception as exc:  # noqa: BLE001 - recorded, and the night goes on
            log.exception("measuring %s failed", path)
            reason = f"{type(exc).__name__}: {exc}"
            repo.mark_image_failed(engine, path, reason)
            res = ImageResult(path, "failed", reason=reason)
        results.append(res)
        detail = (f"{res.n_sources} sources" if res.status == "measured" else res.reason)
        progress(f"[{i}/{len(paths)}] {Path(path).name}: {res.status} ({detail})")
    return results


# --------------------------------------------------------------------------- variability
#
# variability_stats holds two kinds of statistics (see README "Tables"):
#
# * whole-history moments (n_obs, mean, std, min/max, weighted mean, chi2_nu, eta, V,
#   sigma_deviation, first/last mjd) from additive sums: one source_night_sums row per source and
#   night, one source_sums row per source (core.variability.night_partial_sums, metrics_from_sums);
# * the robust baseline and the dip statistic (median, robust std, dip_*) from the epochs of a
#   trailing window of ``dip_window_days`` ending at the source's latest epoch: order statistics and
#   a time-ordered scan cannot come from sums, and an ESE (14-180 days) fits in a year.
#
# A night therefore costs its own photometry rows, one sums row per source and the window rows,
# whatever the length of the history. recompute_variability is the O(history) rebuild, on demand.

#: Columns of variability_stats that are not metrics: catalog values and processing times.
_STATS_EXTRA_COLUMNS = ("ra_deg", "dec_deg", "nvss_flux_mjy", "last_measured_at")


def _flux_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Photometry rows as the measurement table of core.variability (Jy/beam -> mJy)."""
    out = pd.DataFrame({
        "source_id": rows["source_id"].to_numpy(),
        "mjd": rows["mjd"].to_numpy(float),
        "flux_mjy": rows["peak_jyb"].to_numpy(float) * 1e3,
        "flux_err_mjy": rows["peak_err_jyb"].to_numpy(float) * 1e3,
    })
    if "night" in rows.columns:
        out["night"] = rows["night"].to_numpy()
    return out


def _latest_catalog_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Per source (index): catalog position and flux of its latest row, last measured_at."""
    return (rows.sort_values(["source_id", "mjd"], kind="mergesort")
            .groupby("source_id", sort=True)
            .agg(ra_deg=("ra_deg", "last"), dec_deg=("dec_deg", "last"),
                 nvss_flux_mjy=("nvss_flux_mjy", "last"),
                 last_measured_at=("measured_at", "max")))


def _catalog_shifts(rows: pd.DataFrame) -> pd.Series:
    """Shift c of each source's sums: its catalog flux (0 when unknown).

    Why the catalog flux: it is known before the first epoch and close to the mean of nearly every
    source, so sums of d = f - c keep their precision (core.variability, "Additive partial sums"),
    and it stays the same for ever, so sums of different nights add.
    """
    flux = _latest_catalog_values(rows)["nvss_flux_mjy"]
    return flux.where(np.isfinite(flux), 0.0).astype(float)


def _night_sums_of_rows(rows: pd.DataFrame, shifts: pd.Series, *,
                        flux_scale_error: float) -> pd.DataFrame:
    """``source_night_sums`` rows of photometry rows (each source shifted by ``shifts[source]``)."""
    table = _flux_table(rows)
    table["shift_mjy"] = shifts.reindex(table["source_id"]).to_numpy(float)
    sums = night_partial_sums(table, flux_scale_error=flux_scale_error)
    measured = rows.groupby(["source_id", "night"], sort=True)["measured_at"].max()
    sums["last_measured_at"] = measured.reindex(
        pd.MultiIndex.from_frame(sums[["source_id", "night"]])).to_numpy(float)
    sums["flux_scale_error"] = float(flux_scale_error)
    return sums


def _rebuild_sums(conn, source_ids: Sequence[str], *, flux_scale_error: float) -> None:
    """Rebuild the night rows and the total of ``source_ids`` from their whole photometry history.

    O(history): used on demand (recompute) and when the stored sums cannot be updated (a new
    flux_scale_error, or a source with history older than its sums, e.g. after an upgrade).
    """
    rows = repo.source_photometry(conn, source_ids)
    nights = _night_sums_of_rows(rows, _catalog_shifts(rows), flux_scale_error=flux_scale_error)
    repo.replace_night_sums(conn, nights, source_ids=source_ids)
    repo.delete_source_sums(conn, source_ids)  # sources left without photometry have no sums
    if len(nights):
        totals = combine_partial_sums(nights)
        totals = totals.join(_latest_catalog_values(rows), on="source_id")
        totals["flux_scale_error"] = float(flux_scale_error)
        repo.put_source_sums(conn, totals)


def _sources_to_rebuild(conn, rows: pd.DataFrame, stored: pd.DataFrame, *,
                        flux_scale_error: float) -> list[str]:
    """Sources whose stored sums cannot take a difference: a different flux_scale_error (other
    weights), or no sums yet although photometry exists outside these rows."""
    stale = set(stored.loc[stored["flux_scale_error"] != float(flux_scale_error), "source_id"])
    new = sorted(set(rows["source_id"]) - set(stored["source_id"]))
    if new:
        in_rows = rows.groupby("source_id").size()
        in_table = repo.photometry_counts_by_source(conn, new)
        stale.update(s for s in new if in_table.get(s, 0) > in_rows[s])
    return sorted(stale)


def _apply_night_changes(conn, nights: list[str], rows: pd.DataFrame, old: pd.DataFrame,
                         stored: pd.DataFrame, *, flux_scale_error: float) -> None:
    """Steps (b)-(d) of :func:`update_variability`: new night sums, difference to the stored ones
    added to ``source_sums``, night rows replaced. The caller's transaction makes them atomic."""
    shifts = _catalog_shifts(rows)
    known = stored.set_index("source_id")["shift_mjy"]
    shifts.update(known)  # a source keeps its shift for ever: its sums must keep adding
    new = _night_sums_of_rows(rows, shifts, flux_scale_error=flux_scale_error)

    keys = ["source_id", "night"]
    both = new.merge(old[keys + list(SUM_COLUMNS) + list(EXTREME_COLUMNS)], on=keys, how="outer",
                     suffixes=("", "_old"), indicator=True, sort=True)
    # new - old: exactly 0 when a night is re-run on unchanged photometry, so re-runs leave
    # source_sums bit-identical. A pair that vanished (a source no longer measured) subtracts.
    delta = both[keys + list(EXTREME_COLUMNS)].copy()
    for col in SUM_COLUMNS:
        delta[col] = both[col].fillna(0) - both[f"{col}_old"].fillna(0)
    for col in ("n_obs", "n_bad_err"):
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

    repo.add_source_sums(conn, totals)
    repo.replace_night_sums(conn, new, nights=nights)
    if refresh:
        repo.refresh_source_extremes(conn, refresh)
    repo.delete_source_sums(conn, totals["source_id"], only_empty=True)


def _store_stats(conn, source_ids: Sequence[str], *, flux_scale_error: float,
                 dip_window_days: float, now: float) -> pd.DataFrame:
    """Steps (e)-(g): variability_stats of ``source_ids`` from their sums and their window."""
    sums = repo.read_source_sums(conn, source_ids)
    if sums.empty:
        return pd.DataFrame()
    moments = metrics_from_sums(sums)
    window = _flux_table(repo.window_photometry(conn, sums["source_id"], dip_window_days))
    robust = variability_metrics(window, flux_scale_error=flux_scale_error)[list(WINDOW_COLUMNS)]
    stats = (moments.merge(robust, on="source_id", how="left")
             .merge(sums[["source_id", *_STATS_EXTRA_COLUMNS]], on="source_id", how="left"))
    stats = stats[[*METRIC_COLUMNS, *_STATS_EXTRA_COLUMNS]]
    stats["updated_at"] = now
    repo.upsert_variability_stats(conn, stats)
    return stats


def stats_from_lightcurves(lightcurves: pd.DataFrame, *, flux_scale_error: float,
                           now: float | None = None) -> pd.DataFrame:
    """``variability_stats`` rows computed directly from whole photometry histories (Jy/beam rows).

    The reference the incremental path is tested against (every metric over every epoch, no
    window); the pipeline itself uses :func:`update_variability` / :func:`recompute_variability`.
    """
    now = time.time() if now is None else now
    if lightcurves.empty:
        return pd.DataFrame()
    stats = variability_metrics(_flux_table(lightcurves), flux_scale_error=flux_scale_error)
    stats = stats.merge(_latest_catalog_values(lightcurves), left_on="source_id",
                        right_index=True, how="left")
    stats["updated_at"] = now
    return stats


def update_variability(engine: Engine, nights: Sequence[str], *, flux_scale_error: float,
                       dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS,
                       now: float | None = None) -> pd.DataFrame:
    """Update the statistics of every source measured in ``nights``, at a cost bounded by the
    nights, the sources and the dip window -- not by the length of the history.

    In ONE transaction (:func:`repository.sums_transaction`): (a) read the photometry of the
    nights' images only; (b) their per-(source, night) partial sums; (c) the stored night rows of
    those nights; (d) add new - old to ``source_sums`` and replace the night rows; (e) the
    whole-history moments from ``source_sums``; (f) median, robust std and dip statistic over each
    source's last ``dip_window_days``; (g) upsert ``variability_stats``. Sources whose sums cannot be
    updated (another ``flux_scale_error``, or history without sums) are rebuilt from their whole
    history instead. A killed run leaves the previous state; a re-run on unchanged photometry
    leaves every table identical. Returns the rows written to ``variability_stats``.
    """
    now = time.time() if now is None else now
    nights = sorted({str(n) for n in nights})
    with repo.sums_transaction(engine) as conn:
        rows = repo.night_photometry(conn, nights)
        old = repo.night_sums(conn, nights=nights)
        touched = sorted(set(rows["source_id"]) | set(old["source_id"]))
        stored = repo.read_source_sums(conn, touched)
        rebuild = _sources_to_rebuild(conn, rows, stored, flux_scale_error=flux_scale_error)
        if rebuild:
            log.info("rebuilding the sums of %d sources from their whole history", len(rebuild))
            rows, old, stored = (df[~df["source_id"].isin(rebuild)] for df in (rows, old, stored))
        if len(rows) or len(old):
            _apply_night_changes(conn, nights, rows, old, stored,
                                 flux_scale_error=flux_scale_error)
        if rebuild:  # after the night rows of `nights` were replaced: this rewrites all of theirs
            _rebuild_sums(conn, rebuild, flux_scale_error=flux_scale_error)
        return _store_stats(conn, touched, flux_scale_error=flux_scale_error,
                            dip_window_days=dip_window_days, now=now)


def recompute_variability(engine: Engine, source_ids: Sequence[str] | None = None, *,
                          flux_scale_error: float,
                          dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS, chunk: int = 2000,
                          progress: Progress = _silent) -> int:
    """Rebuild sums and statistics of ``source_ids`` (all sources when None) from ``photometry``.

    The full O(history) path (``ese detect --recompute``, the API): per chunk of sources, one
    transaction rewrites their ``source_night_sums`` and ``source_sums`` rows from their whole
    history, then their ``variability_stats``. Returns the number of sources with statistics.
    """
    if source_ids is None:
        ids = sorted(set(repo.measured_source_ids(engine))
                     | set(repo.read_source_sums(engine)["source_id"]))
    else:
        ids = sorted({str(s) for s in source_ids})
    done = 0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        with repo.sums_transaction(engine) as conn:
            _rebuild_sums(conn, part, flux_scale_error=flux_scale_error)
            stats = _store_stats(conn, part, flux_scale_error=flux_scale_error,
                                 dip_window_days=dip_window_days, now=time.time())
        done += len(stats)
        progress(f"variability statistics: {min(start + chunk, len(ids))}/{len(ids)} sources")
    return done


# --------------------------------------------------------------------------- detection


@dataclass
class DetectionSummary:
    flagged: pd.DataFrame  # one row per flagged source (core.detection.flag_candidates)
    inserted: int
    updated: int


def detect_candidates(engine: Engine, settings: DetectionSettings, *,
                      source_ids: Sequence[str] | None = None, night: str | None = None,
                      now: float | None = None) -> DetectionSummary:
    """Flag sources whose statistics pass the detection rules and update ``ese_candidates``.

    ``source_ids=None`` examines every source with statistics. Re-running is idempotent: open
    candidates are updated in place, dismissed ones stay dismissed unless their significance grew.
    """
    now = time.time() if now is None else now
    stats = repo.variability_stats(engine, source_ids=source_ids)
    flagged = flag_candidates(stats, settings) if not stats.empty else pd.DataFrame(
        columns=["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"])
    if flagged.empty:
        return DetectionSummary(flagged, 0, 0)
    existing = repo.existing_candidates(engine, flagged["source_id"].tolist())
    inserts, updates = plan_candidate_changes(flagged, existing, night=night, now=now)
    repo.apply_candidate_changes(engine, inserts, updates)
    return DetectionSummary(flagged, len(inserts), len(updates))

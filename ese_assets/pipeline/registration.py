"""Registration: new files in ``images``, usable ones ``pending``, the rest ``rejected`` with a
reason.

Reads only FITS headers, in batches of :data:`REGISTER_BATCH` files per transaction.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from ese_assets.core.fits_image import ImageError, ImageInfo, read_image_info
from ese_assets.core.nights import night_of_mjd
from ese_assets.pipeline.progress import Progress, silent
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db

log = logging.getLogger(__name__)

#: Files with these endings are partial copies by convention (rsync, browsers, editors): never
#: inspected, so a transfer in progress is not rejected.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".lock", ".filepart")

#: File name endings of FITS images (case-insensitive). Such a file is always examined (and rejected
#: with the reason when it is not a usable image); any other file is examined only when it starts
#: like a FITS file (:data:`FITS_MAGIC`), so catalogs, truth tables, PNG quick-looks and logs
#: beside the images are ignored rather than registered as rejected images.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")
#: The first bytes of every FITS file: the primary header's first card (FITS standard 4.0, 4.4.1).
FITS_MAGIC = b"SIMPLE  ="

#: Two registrations closer than this in time (days) and pointing (degrees) are the same
#: observation.
DUPLICATE_MJD_TOL_DAYS = 1.0 / 86400.0
DUPLICATE_POINTING_TOL_DEG = 1.0 / 3600.0

#: New files whose headers are read and registered per transaction.
REGISTER_BATCH = 500


@dataclass
class ScanResult:
    """Outcome of looking at a directory (or an explicit list of files)."""

    registered: list[str] = field(default_factory=list)  # new usable images, status pending
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    waiting: list[str] = field(default_factory=list)  # still being written; looked at next time
    already_known: int = 0
    deferred: int = 0  # new files left for the next call (``limit``)
    changed: list[str] = field(default_factory=list)  # registered files that changed: re-examined
    ignored: int = 0  # files that are not FITS (by name and first bytes): not registered


def is_fits_file(path: str | os.PathLike[str]) -> bool:
    """True when the file's name ends in one of :data:`FITS_SUFFIXES` or its first bytes are
    :data:`FITS_MAGIC` (an unreadable file with another name is not FITS)."""
    if os.fspath(path).lower().endswith(FITS_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(len(FITS_MAGIC)) == FITS_MAGIC
    except OSError:
        return False


def _visible_files(directory: str) -> list[os.DirEntry]:
    """Regular, visible files of one directory, partial-transfer names excluded."""
    with os.scandir(directory) as entries:
        return [
            e
            for e in entries
            if e.is_file(follow_symlinks=True)
            and not e.name.startswith(".")
            and not e.name.lower().endswith(PARTIAL_SUFFIXES)
        ]


def _candidate_files(directory: Path, *, recursive: bool = False) -> tuple[list[str], int]:
    """(paths of the FITS files of ``directory``, number of other files ignored).

    ``recursive``: also every visible sub-directory (symbolic links to directories are not
    followed, so a link cannot make the walk loop). Paths sorted.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"incoming directory {directory} does not exist")
    if recursive:
        entries = []
        for root, dirs, _ in os.walk(directory):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            entries += _visible_files(root)
    else:
        entries = _visible_files(str(directory))
    fits = sorted(e.path for e in entries if is_fits_file(e.path))
    return fits, len(entries) - len(fits)


def fits_in_subdirectories(directory: str | Path, limit: int = 1000) -> tuple[int, str | None]:
    """(FITS file names found in the sub-directories of ``directory``, counting at most
    ``limit``; the first sub-directory holding one): the hint for a directory of dated
    sub-directories scanned without ``recursive``."""
    count, first = 0, None
    top = Path(directory).expanduser().resolve()
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(root) == top:
            continue
        found = sum(f.lower().endswith(FITS_SUFFIXES) for f in files)
        if found and first is None:
            first = root
        count += found
        if count >= limit:
            break
    return count, first


def _file_facts(stat: os.stat_result) -> dict:
    """What identifies a file's version: size and modification time (content), change time
    (permissions: a rejected unreadable file that becomes readable)."""
    return {"file_size": stat.st_size, "file_mtime": stat.st_mtime, "file_ctime": stat.st_ctime}


def _image_record(info: ImageInfo, *, night: str, stat: os.stat_result, now: float) -> dict:
    return {
        "path": info.path,
        "night": night,
        "mjd": info.mjd,
        "date_obs": info.date_obs,
        "beam_maj_deg": info.beam.major_deg,
        "beam_min_deg": info.beam.minor_deg,
        "beam_pa_deg": info.beam.pa_deg,
        "freq_hz": info.freq_hz,
        "ra_center_deg": info.center_ra_deg,
        "dec_center_deg": info.center_dec_deg,
        "radius_deg": info.radius_deg,
        "naxis1": info.shape[1],
        "naxis2": info.shape[0],
        "status": "pending",
        "reason": None,
        "registered_at": now,
        **_file_facts(stat),
    }


def _rejected_record(
    path: str,
    reason: str,
    *,
    stat: os.stat_result,
    now: float,
    night: str | None = None,
    mjd: float | None = None,
) -> dict:
    return {
        "path": path,
        "night": night,
        "mjd": mjd,
        "status": "rejected",
        "reason": reason,
        "registered_at": now,
        **_file_facts(stat),
    }


def _same_pointing(a: dict, b: dict) -> bool:
    """Observation centres closer than :data:`DUPLICATE_POINTING_TOL_DEG` on both axes."""
    dra = (a["ra_center_deg"] - b["ra_center_deg"] + 180.0) % 360.0 - 180.0
    return (
        abs(dra * np.cos(np.radians(a["dec_center_deg"]))) < DUPLICATE_POINTING_TOL_DEG
        and abs(a["dec_center_deg"] - b["dec_center_deg"]) < DUPLICATE_POINTING_TOL_DEG
    )


def inspect_files(
    engine: Engine,
    paths: Iterable[str],
    *,
    timezone: str,
    first_night: str,
    settle_seconds: float = 0.0,
    now: float | None = None,
    limit: int | None = None,
    progress: Progress = silent,
) -> ScanResult:
    """Register the given files in ``images``: usable images as ``pending``, others ``rejected``.

    Files already in ``images`` are left alone unless they changed since (see
    :func:`_release_changed_files`): then they are examined again as new files, and a measured
    file rewritten in place is measured again (its rows are replaced in one transaction). A file
    modified less than ``settle_seconds`` ago is still being written and is left for the next
    look. A file is rejected (with a reason
    that names the file and the problem) when it is not a readable FITS image with WCS, beam and
    time, when its night precedes ``first_night`` (the first partition), or when it duplicates an
    image already registered (same observation time and pointing, e.g. the same file copied under
    another name).

    Headers are read and registered in batches of :data:`REGISTER_BATCH` files, each batch in one
    transaction, so a large backlog makes steady progress. ``limit`` caps the new files examined in
    this call (the sensor's tick must stay short); the rest are counted in ``result.deferred``.
    """
    now = time.time() if now is None else now
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    result = ScanResult()
    result.changed = _release_changed_files(engine, paths, now=now, settle_seconds=settle_seconds)
    known = images_db.known_image_paths(engine, paths)
    result.already_known = len(known)
    new = [p for p in paths if p not in known]
    if limit is not None and len(new) > limit:
        result.deferred = len(new) - limit
        new = new[:limit]
    for start in range(0, len(new), REGISTER_BATCH):
        _register_batch(
            engine,
            new[start : start + REGISTER_BATCH],
            result,
            timezone=timezone,
            first_night=first_night,
            settle_seconds=settle_seconds,
            now=now,
            progress=progress,
        )
        if len(new) > REGISTER_BATCH:
            progress(f"examined {min(start + REGISTER_BATCH, len(new))}/{len(new)} new files")
    return result


def _register_batch(
    engine: Engine,
    paths: list[str],
    result: ScanResult,
    *,
    timezone: str,
    first_night: str,
    settle_seconds: float,
    now: float,
    progress: Progress,
) -> None:
    records: list[dict] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue  # vanished between listing and inspection: nothing to register
        if now - stat.st_mtime < settle_seconds:
            result.waiting.append(path)
            continue
        records.append(
            _inspect_one(path, stat, timezone=timezone, first_night=first_night, now=now)
        )
    _reject_duplicates(engine, [r for r in records if r["status"] == "pending"])
    images_db.register_images(engine, records)
    # A measured file rewritten into something unusable: its old rows describe no file any more.
    changed = set(result.changed)
    photometry_db.delete_image_photometry(
        engine, [r["path"] for r in records if r["status"] == "rejected" and r["path"] in changed]
    )
    for rec in records:
        if rec["status"] == "pending":
            result.registered.append(rec["path"])
        else:
            result.rejected.append((rec["path"], rec["reason"]))
            log.info("rejected %s: %s", rec["path"], rec["reason"])
            progress(f"rejected {rec['path']}: {rec['reason']}")


def _reject_duplicates(engine: Engine, usable: list[dict]) -> None:
    """Mark records that repeat an observation already registered (or earlier in ``usable``).

    Observations are indexed by their start time in whole seconds, so each record is compared
    only with the few observations within a second of it.
    """
    if not usable:
        return
    mjds = [r["mjd"] for r in usable]
    registered = images_db.images_near_mjd(
        engine, min(mjds) - DUPLICATE_MJD_TOL_DAYS, max(mjds) + DUPLICATE_MJD_TOL_DAYS
    )
    by_second: dict[int, list[dict]] = {}

    def second(rec: dict) -> int:
        return round(rec["mjd"] * 86400.0)

    for rec in registered.to_dict("records"):
        by_second.setdefault(second(rec), []).append(rec)
    for rec in usable:
        near = (
            o for k in (second(rec) - 1, second(rec), second(rec) + 1) for o in by_second.get(k, ())
        )
        twin = next(
            (
                o["path"]
                for o in near
                if o["path"] != rec["path"]
                and abs(o["mjd"] - rec["mjd"]) < DUPLICATE_MJD_TOL_DAYS
                and _same_pointing(o, rec)
            ),
            None,
        )
        if twin is None:
            by_second.setdefault(second(rec), []).append(rec)  # duplicates may arrive together
        else:
            rec.update(
                status="rejected",
                reason=f"duplicate of {twin} (same observation time and pointing)",
            )


def _release_changed_files(
    engine: Engine, paths: list[str], *, now: float, settle_seconds: float
) -> list[str]:
    """Forget the registrations of files that changed since; returns their paths.

    A change of size or modification time means new content (an image rewritten in place, a
    stalled transfer that completed); for rejected files a change of the change time (ctime)
    counts too, since it is how a permission fix shows (``chmod`` does not touch the content).
    Files still settling are left for a later look, as new files are.
    """
    states = images_db.file_states(engine, paths)
    changed = []
    for row in states.itertuples(index=False):
        try:
            stat = os.stat(row.path)
        except OSError:
            continue  # gone, or unreachable: nothing to re-examine now
        if now - stat.st_mtime < settle_seconds:
            continue
        content = row.file_size != stat.st_size or _differs(row.file_mtime, stat.st_mtime)
        access = row.status == "rejected" and _differs(row.file_ctime, stat.st_ctime)
        if content or access:
            changed.append(row.path)
    if changed:
        images_db.forget_images(engine, changed)
        log.info("re-examining %d files that changed: %s", len(changed), changed[:5])
    return changed


def _differs(recorded: float | None, actual: float) -> bool:
    return recorded is None or recorded != recorded or abs(recorded - actual) > 1e-6


def _inspect_one(
    path: str, stat: os.stat_result, *, timezone: str, first_night: str, now: float
) -> dict:
    try:
        info = read_image_info(path)
    except ImageError as exc:
        return _rejected_record(path, exc.reason, stat=stat, now=now)
    except OSError as exc:  # permissions and the like: record, never stop the scan
        return _rejected_record(
            path, f"cannot read file ({exc.strerror or exc})", stat=stat, now=now
        )
    night = night_of_mjd(info.mjd, timezone)
    if night < first_night:
        return _rejected_record(
            path,
            f"observation night {night} precedes the first partition {first_night} "
            f"(set ESE_PARTITION_START)",
            stat=stat,
            now=now,
            night=night,
            mjd=info.mjd,
        )
    return _image_record(info, night=night, stat=stat, now=now)


def scan_directory(
    engine: Engine, directory: str | Path, *, recursive: bool = False, **kwargs
) -> ScanResult:
    """:func:`inspect_files` over the FITS files of ``directory`` (and of its sub-directories when
    ``recursive``); see there for the rules. Files that are not FITS (:func:`is_fits_file`) are
    counted in ``result.ignored``, not registered."""
    paths, ignored = _candidate_files(Path(directory).expanduser().resolve(), recursive=recursive)
    result = inspect_files(engine, paths, **kwargs)
    result.ignored = ignored
    return result

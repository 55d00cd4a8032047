"""The ``images`` table: one row per file seen, its header facts and its processing status."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa

from ese_assets.storage.access import (
    Bind,
    check_columns,
    check_statuses,
    chunks,
    clean_mapping,
    dialect_insert,
    now,
    read_chunked,
    read_frame,
    reading,
    unique_str,
    writing,
)
from ese_assets.storage.schema import IMAGE_STATUSES, UNFINISHED_STATUSES, images

#: Statuses :func:`night_images` returns by default: every image that is not ``rejected``.
USABLE_STATUSES = tuple(s for s in IMAGE_STATUSES if s != "rejected")


def known_image_paths(bind: Bind, paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` already registered in ``images`` (any status)."""
    found: set[str] = set()
    with reading(bind) as conn:
        for chunk in chunks(unique_str(paths)):
            found.update(
                conn.execute(sa.select(images.c.path).where(images.c.path.in_(chunk))).scalars()
            )
    return found


def file_states(bind: Bind, paths: Iterable[str]) -> pd.DataFrame:
    """What was recorded about the files among ``paths`` that are registered.

    DataFrame[path, status, file_size, file_mtime, file_ctime], one row per registered path.
    """

    def stmt(chunk: list[str]) -> sa.Select[Any]:
        return sa.select(
            images.c.path,
            images.c.status,
            images.c.file_size,
            images.c.file_mtime,
            images.c.file_ctime,
        ).where(images.c.path.in_(chunk))

    with reading(bind) as conn:
        return read_chunked(conn, stmt, unique_str(paths))


def forget_images(bind: Bind, paths: Iterable[str]) -> int:
    """Delete the ``images`` rows of ``paths`` so the files are registered again; returns count.

    Used for files that changed since they were registered (rewritten in place, a stalled
    transfer completed, a permission fixed). Their photometry rows stay until the new content is
    measured (one transaction replaces them) or rejected (then the caller deletes them).
    """
    deleted = 0
    with writing(bind) as conn:
        for chunk in chunks(unique_str(paths)):
            deleted += conn.execute(sa.delete(images).where(images.c.path.in_(chunk))).rowcount
    return deleted


def register_images(bind: Bind, records: list[dict[str, Any]]) -> int:
    """Insert ``images`` rows; a path already present is left untouched. Returns rows inserted.

    Each record needs ``path``; ``status`` defaults to ``"pending"`` and ``registered_at`` to now.
    Other keys must be ``images`` columns (a typo raises ValueError rather than silently dropping
    data). Uses ``INSERT ... ON CONFLICT (path) DO NOTHING`` so concurrent sensors cannot race.
    """
    if not records:
        return 0
    registered_at = now()
    by_path: dict[str, dict[str, Any]] = {}
    keys: set[str] = {"path", "status", "registered_at"}
    for record in records:
        if "path" not in record or record["path"] is None:
            raise ValueError(f"register_images: record without path: {record!r}")
        check_columns(images, record.keys(), "register_images")
        if "id" in record:
            raise ValueError("register_images: 'id' is assigned by the database")
        row = clean_mapping(record)
        row["path"] = str(row["path"])
        row.setdefault("status", "pending")
        if row.get("registered_at") is None:
            row["registered_at"] = registered_at
        if row["status"] not in IMAGE_STATUSES:
            raise ValueError(f"register_images: invalid status {row['status']!r} for {row['path']}")
        by_path.setdefault(row["path"], row)  # first record of a duplicated path wins
        keys.update(row.keys())
    # executemany needs the same keys in every parameter set.
    rows = [{k: row.get(k) for k in sorted(keys)} for _, row in sorted(by_path.items())]
    with writing(bind) as conn:
        stmt = (
            dialect_insert(conn, images)
            .on_conflict_do_nothing(index_elements=[images.c.path])
            .returning(images.c.path)
        )
        inserted = 0
        for chunk in chunks(rows):
            inserted += len(conn.execute(stmt, chunk).all())
    return inserted


def set_image_status(
    bind: Bind, paths: Iterable[str], status: str, reason: str | None = None
) -> int:
    """Set ``status`` and ``reason`` (cleared when None) of the given images; returns the rows
    updated."""
    check_statuses(status, IMAGE_STATUSES, "image status")
    wanted = unique_str(paths)
    updated = 0
    if not wanted:
        return 0
    with writing(bind) as conn:
        for chunk in chunks(wanted):
            result = conn.execute(
                images.update().where(images.c.path.in_(chunk)).values(status=status, reason=reason)
            )
            updated += result.rowcount
    return updated


def mark_image_failed(bind: Bind, path: str, reason: str) -> int:
    """Set an image to ``failed`` with the reason (earlier photometry rows, if any, stay).

    Its retry time is the one set when it was last requested (:func:`claim_images`), or now for
    an image that was never requested, so an automatic retry stays possible; only
    :func:`give_up_images` stops them.
    """
    with writing(bind) as conn:
        return conn.execute(
            images.update()
            .where(images.c.path == str(path))
            .values(
                status="failed",
                reason=reason,
                next_attempt_at=sa.func.coalesce(images.c.next_attempt_at, now()),
            )
        ).rowcount


def unfinished_images(bind: Bind) -> pd.DataFrame:
    """Images that still need a run (:data:`UNFINISHED_STATUSES`), with their bookkeeping.

    DataFrame[path, night, status, reason, batch_token, attempts, queued_at, next_attempt_at],
    ordered by night and path.
    """
    stmt = (
        sa.select(
            images.c.path,
            images.c.night,
            images.c.status,
            images.c.reason,
            images.c.batch_token,
            images.c.attempts,
            images.c.queued_at,
            images.c.next_attempt_at,
        )
        .where(images.c.status.in_(UNFINISHED_STATUSES))
        .order_by(images.c.night, images.c.path)
    )
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def claim_images(
    bind: Bind, expected: Sequence[Mapping[str, Any]], token: str, *, queued_at: float
) -> list[str]:
    """Queue the images of ``expected`` for the run of batch ``token``; returns the paths claimed.

    Each item of ``expected`` holds ``path``, ``status`` and ``batch_token`` as read by the
    caller, and ``retry_at``: when the image may be requested again if this run does not measure
    it. An image is claimed only if it still has that status and token, so two processes
    planning at once (the sensor and ``ese ingest``) never queue the same image twice: on SQLite
    the write transaction serialises them, on PostgreSQL the row's conditions are re-checked
    after a concurrent update.
    """
    if not expected:
        return []
    stmt = (
        images.update()
        .where(
            images.c.path == sa.bindparam("b_path"),
            images.c.status == sa.bindparam("b_status"),
            sa.func.coalesce(images.c.batch_token, "") == sa.bindparam("b_token"),
        )
        .values(
            status="queued",
            batch_token=token,
            queued_at=queued_at,
            next_attempt_at=sa.bindparam("b_retry"),
            attempts=images.c.attempts + 1,
        )
    )
    params = [
        {
            "b_path": str(e["path"]),
            "b_status": str(e["status"]),
            "b_token": str(e.get("batch_token") or ""),
            "b_retry": float(e["retry_at"]),
        }
        for e in expected
    ]
    with writing(bind) as conn:
        for chunk in chunks(params):
            conn.execute(stmt, chunk)
        return sorted(
            conn.execute(sa.select(images.c.path).where(images.c.batch_token == token)).scalars()
        )


def give_up_images(bind: Bind, paths: Iterable[str], reason: str) -> int:
    """Mark images ``failed`` with no automatic retry (the sensor's attempts are used up)."""
    updated = 0
    with writing(bind) as conn:
        for chunk in chunks(unique_str(paths)):
            updated += conn.execute(
                images.update()
                .where(images.c.path.in_(chunk))
                .values(status="failed", reason=reason, next_attempt_at=None)
            ).rowcount
    return updated


def set_waiting_reason(bind: Bind, paths: Iterable[str], reason: str | None) -> int:
    """Record why pending images are not requested yet (e.g. their night does not exist)."""
    updated = 0
    with writing(bind) as conn:
        for chunk in chunks(unique_str(paths)):
            updated += conn.execute(
                images.update()
                .where(
                    images.c.path.in_(chunk),
                    images.c.status == "pending",
                    sa.func.coalesce(images.c.reason, "") != (reason or ""),
                )
                .values(reason=reason)
            ).rowcount
    return updated


def pending_images(bind: Bind) -> pd.DataFrame:
    """Images registered but not yet queued: DataFrame[path, night], ordered by night, path."""
    stmt = (
        sa.select(images.c.path, images.c.night)
        .where(images.c.status == "pending")
        .order_by(images.c.night, images.c.path)
    )
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def night_images(
    bind: Bind, night: str, statuses: Sequence[str] | str | None = USABLE_STATUSES
) -> pd.DataFrame:
    """All ``images`` columns of a night's images with one of ``statuses`` (None: any), by mjd."""
    wanted = check_statuses(statuses, IMAGE_STATUSES, "image status")
    stmt = sa.select(images).where(images.c.night == str(night))
    if wanted is not None:
        stmt = stmt.where(images.c.status.in_(wanted))
    stmt = stmt.order_by(images.c.mjd, images.c.path)
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def rejected_images(
    bind: Bind, night: str | None = None, since: float | None = None
) -> pd.DataFrame:
    """Rejected files: DataFrame[path, night, reason, registered_at], newest first.

    ``night`` filters on the partition, ``since`` on ``registered_at >= since`` (Unix seconds).
    """
    stmt = sa.select(images.c.path, images.c.night, images.c.reason, images.c.registered_at).where(
        images.c.status == "rejected"
    )
    if night is not None:
        stmt = stmt.where(images.c.night == str(night))
    if since is not None:
        stmt = stmt.where(images.c.registered_at >= float(since))
    stmt = stmt.order_by(images.c.registered_at.desc(), images.c.path)
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def image_counts_by_status(
    bind: Bind, night: str | None = None, *, nights: Iterable[str] | None = None
) -> dict[str, int]:
    """Images per status (every status present, zeros included).

    ``night`` (one partition) and/or ``nights`` (several) restrict the count; neither: all images.
    """
    wanted = unique_str(nights) if nights is not None else None
    if night is not None:
        wanted = sorted(set(wanted or []) | {str(night)})
    counts = dict.fromkeys(IMAGE_STATUSES, 0)
    with reading(bind) as conn:
        for chunk in [None] if wanted is None else list(chunks(wanted)):
            stmt = sa.select(images.c.status, sa.func.count()).group_by(images.c.status)
            if chunk is not None:
                stmt = stmt.where(images.c.night.in_(chunk))
            for status, count in conn.execute(stmt):
                counts[status] = counts.get(status, 0) + int(count)
    return counts


def images_near_mjd(bind: Bind, mjd_min: float, mjd_max: float) -> pd.DataFrame:
    """Usable (not rejected) images with ``mjd_min <= mjd <= mjd_max``, for duplicate detection.

    Columns: path, night, mjd, ra_center_deg, dec_center_deg, status; ordered by mjd, path.
    """
    stmt = (
        sa.select(
            images.c.path,
            images.c.night,
            images.c.mjd,
            images.c.ra_center_deg,
            images.c.dec_center_deg,
            images.c.status,
        )
        .where(
            images.c.mjd >= float(mjd_min),
            images.c.mjd <= float(mjd_max),
            images.c.status != "rejected",
        )
        .order_by(images.c.mjd, images.c.path)
    )
    with reading(bind) as conn:
        return read_frame(conn, stmt)

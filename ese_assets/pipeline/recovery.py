"""Recovery without a person: which unfinished images to request next, in which batches.

Failure is a state, not an event. Every image that is neither ``measured`` nor ``rejected`` is
picked up again by the next sensor tick (and by ``ese ingest``):

* ``pending``: registered, never requested.
* ``queued`` whose batch has no live run: the run failed, was canceled, died with its process, or
  was never launched (the daemon stopped between registration and launch; a batch with no run at
  all is given ``grace_s`` to appear). Requested again once its backoff has elapsed.
* ``failed``: the measurement itself raised (e.g. an I/O error reading the file). Retried after
  its backoff.

Backoff: the n-th request of an image may be followed by the next one after
``retry_delay_s * 2**(n-1)`` seconds (at most :data:`MAX_BACKOFF_S`); after ``max_attempts``
requests the sensor gives up and the image stays ``failed`` with its reason (the nightly
reconciliation and ``ese ingest`` still retry it). ``ese ingest`` is *impatient*: a person is
waiting, so it requests every unfinished image at once, whatever its backoff.

Images of a night that does not exist yet (a clock running ahead, a wrong ``DATE-OBS``) wait with
that reason and are requested once the night begins. Nights a full-night run is processing are
left alone until it ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy import Engine

from ese_assets.storage import images as images_db

#: Longest wait between two automatic requests of one image.
MAX_BACKOFF_S = 3600.0
#: A batch whose run has not appeared this long after it was queued was never launched.
ORPHAN_GRACE_S = 120.0
#: Upper bound on images per run, so one run of a busy night stays minutes long, not hours.
MAX_IMAGES_PER_RUN = 400


def retry_delay(attempts: int, delay_s: float) -> float:
    """Seconds to wait after the ``attempts``-th request: ``delay_s * 2**(attempts-1)``, capped."""
    return min(MAX_BACKOFF_S, delay_s * 2.0 ** max(attempts - 1, 0))


def future_night_reason(night: str, last_night: str) -> str:
    return (
        f"observation night {night} does not exist yet (the latest night is {last_night}: "
        "clock ahead or wrong DATE-OBS?); it is measured once that night begins"
    )


@dataclass(frozen=True)
class Batch:
    """Images of one night requested together: one run, tagged with ``token``."""

    night: str
    token: str
    paths: tuple[str, ...]
    # The rows as planned (path, status, batch_token, retry_at), for a claim made later.
    expected: tuple[dict, ...] = field(default=(), compare=False, repr=False)

    @property
    def run_key(self) -> str:
        return f"{self.night}:{self.token}"


@dataclass
class Plan:
    """What :func:`plan_runs` requested and what it left, for logs and the CLI."""

    batches: list[Batch] = field(default_factory=list)
    new: int = 0  # pending images requested
    resumed: int = 0  # queued images whose run is gone, requested again
    retried: int = 0  # failed images requested again
    in_flight: int = 0  # left alone: a live run has them
    backing_off: int = 0  # left alone until their backoff elapses
    future: list[str] = field(default_factory=list)  # their night does not exist yet
    gave_up: list[str] = field(default_factory=list)  # attempts used up (now failed)

    @property
    def n_images(self) -> int:
        return sum(len(b.paths) for b in self.batches)

    def summary(self) -> str:
        parts = [f"{self.n_images} images in {len(self.batches)} runs"]
        for count, what in (
            (self.new, "new"),
            (self.resumed, "resumed after an interrupted or failed run"),
            (self.retried, "failed before, retried"),
            (self.in_flight, "already being measured"),
            (self.backing_off, "waiting for their retry time"),
            (len(self.future), "waiting for their night to begin"),
            (len(self.gave_up), "given up after repeated failures"),
        ):
            if count:
                parts.append(f"{count} {what}")
        return "; ".join(parts)


def _in_ranges(night: str, ranges: Iterable[tuple[str, str]]) -> bool:
    return any(first <= night <= last for first, last in ranges)


def _choose(
    row,
    *,
    now: float,
    patient: bool,
    max_attempts: int,
    grace_s: float,
    in_flight_tokens: set[str],
    launched: set[str],
) -> str:
    """``take`` (and why: new/resumed/retried), or why the image is left alone."""
    attempts = int(row.attempts or 0)
    retry_due = pd.isna(row.next_attempt_at) or row.next_attempt_at <= now
    if row.status == "pending":
        return "new"
    if row.status == "queued":
        if row.batch_token in in_flight_tokens:
            return "in_flight"
        never_launched = row.batch_token not in launched
        if never_launched and not pd.isna(row.queued_at) and row.queued_at + grace_s > now:
            return "in_flight"  # its run may still be on its way
        if patient and attempts >= max_attempts:
            return "give_up"
        return "resumed" if (not patient or retry_due) else "backing_off"
    # failed
    if not patient:
        return "retried"
    if pd.isna(row.next_attempt_at) or attempts >= max_attempts:
        return "permanent"
    return "retried" if retry_due else "backing_off"


def plan_runs(
    engine: Engine,
    *,
    last_night: str,
    in_flight_tokens: set[str],
    in_flight_nights: Iterable[tuple[str, str]] = (),
    tokens_with_runs: Callable[[set[str]], set[str]] = lambda tokens: set(),
    retry_delay_s: float,
    max_attempts: int,
    patient: bool = True,
    grace_s: float = ORPHAN_GRACE_S,
    max_images_per_run: int = MAX_IMAGES_PER_RUN,
    claim: bool = True,
    now: float | None = None,
) -> Plan:
    """Choose the unfinished images to request now, group them in batches and claim them.

    ``in_flight_tokens`` / ``in_flight_nights`` describe the live runs (Dagster instance);
    ``tokens_with_runs`` tells which of some batch tokens have a run in any status (a batch
    queued less than ``grace_s`` ago without one may still be being launched). ``patient``: the
    sensor (backoff and ``max_attempts`` respected); impatient: ``ese ingest``. ``claim=False``
    leaves the claiming to :func:`claim_batch`, just before each batch runs: a process that runs
    its batches one after the other (``ese ingest``) must not hold batches it has not started,
    or a re-run after it was killed would take them for batches still being launched.
    """
    now = time.time() if now is None else now
    plan = Plan()
    rows = images_db.unfinished_images(engine)
    if rows.empty:
        return plan
    in_flight_nights = list(in_flight_nights)
    future = rows["night"] > last_night
    plan.future = sorted(rows.loc[future, "path"])
    for night, group in rows[future].groupby("night"):
        images_db.set_waiting_reason(engine, group["path"], future_night_reason(night, last_night))
    rows = rows[~future]
    if rows.empty:
        return plan
    busy_night = rows["night"].map(lambda n: _in_ranges(n, in_flight_nights)).astype(bool)
    plan.in_flight += int(busy_night.sum())
    rows = rows[~busy_night]

    recent = rows[
        (rows["status"] == "queued")
        & ~rows["batch_token"].isin(in_flight_tokens)
        & (rows["queued_at"] + grace_s > now)
    ]
    launched = tokens_with_runs(set(recent["batch_token"].dropna())) if len(recent) else set()
    choice = pd.Series(
        [
            _choose(
                r,
                now=now,
                patient=patient,
                max_attempts=max_attempts,
                grace_s=grace_s,
                in_flight_tokens=in_flight_tokens,
                launched=launched,
            )
            for r in rows.itertuples(index=False)
        ],
        index=rows.index,
        dtype=object,
    )
    plan.in_flight += int((choice == "in_flight").sum())
    plan.backing_off += int((choice == "backing_off").sum())
    plan.gave_up = sorted(rows.loc[choice == "give_up", "path"])
    if plan.gave_up:
        images_db.give_up_images(
            engine,
            plan.gave_up,
            f"requested {max_attempts} times without being measured (see the failed runs of "
            "its batch in the Dagster UI); the nightly run and `ese ingest` will try again",
        )
    take = rows[choice.isin(["new", "resumed", "retried"])].assign(kind=choice)
    for night, group in take.groupby("night", sort=True):
        group = group.sort_values("path")
        for start in range(0, len(group), max_images_per_run):
            chunk = group.iloc[start : start + max_images_per_run]
            token = uuid.uuid4().hex[:16]
            expected = [
                {
                    "path": r.path,
                    "status": r.status,
                    "batch_token": None if pd.isna(r.batch_token) else r.batch_token,
                    "retry_at": now + retry_delay(int(r.attempts or 0) + 1, retry_delay_s),
                }
                for r in chunk.itertuples(index=False)
            ]
            batch = Batch(str(night), token, tuple(chunk["path"]), tuple(expected))
            if claim:
                batch = claim_batch(engine, batch, now=now)
                if batch is None:
                    continue
            kinds = chunk.set_index("path").loc[list(batch.paths), "kind"]
            plan.new += int((kinds == "new").sum())
            plan.resumed += int((kinds == "resumed").sum())
            plan.retried += int((kinds == "retried").sum())
            plan.batches.append(batch)
    return plan


def claim_batch(engine: Engine, batch: Batch, *, now: float | None = None) -> Batch | None:
    """Queue the images of a planned batch that nobody claimed since; None if none are left."""
    now = time.time() if now is None else now
    claimed = images_db.claim_images(engine, batch.expected, batch.token, queued_at=now)
    if not claimed:
        return None
    return Batch(batch.night, batch.token, tuple(claimed), batch.expected)

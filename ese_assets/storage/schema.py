"""Table definitions (SQLAlchemy Core), portable between SQLite and PostgreSQL.

Column names follow the seed system (``photometry``, ``variability_stats``, ``ese_candidates``) so
that queries users already know keep working; columns added by this project are marked below.
Times: ``mjd``/``*_mjd`` are observation times (Modified Julian Date, from the FITS header);
``measured_at``/``updated_at``/``flagged_at``/``registered_at`` are processing times (Unix seconds).
"""

from __future__ import annotations

import sqlalchemy as sa

from ese_assets.core.candidates import CANDIDATE_STATUSES, OPEN_STATUSES
from ese_assets.core.sums import COUNT_COLUMNS, EXTREME_COLUMNS, LATER_SUM_COLUMNS, SUM_COLUMNS

metadata = sa.MetaData()

#: Image lifecycle: ``pending`` (registered, waiting for a run) -> ``queued`` (a run was requested
#: for its batch) -> ``measured`` | ``failed`` (the measurement raised; retried with backoff).
#: ``rejected`` files are not usable images (corrupt, missing keywords...): never measured, but
#: examined again when the file changes. Anything not measured or rejected is picked up again
#: automatically (:mod:`ese_assets.pipeline.recovery`).
IMAGE_STATUSES = ("pending", "queued", "measured", "failed", "rejected")
#: Statuses of images that still need a run.
UNFINISHED_STATUSES = ("pending", "queued", "failed")

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("path", sa.Text, nullable=False, unique=True),
    sa.Column("night", sa.String(10), nullable=True),  # partition key YYYY-MM-DD; NULL if unknown
    sa.Column("mjd", sa.Float, nullable=True),
    sa.Column("date_obs", sa.String(32), nullable=True),
    sa.Column("beam_maj_deg", sa.Float, nullable=True),
    sa.Column("beam_min_deg", sa.Float, nullable=True),
    sa.Column("beam_pa_deg", sa.Float, nullable=True),
    sa.Column("freq_hz", sa.Float, nullable=True),
    sa.Column("ra_center_deg", sa.Float, nullable=True),
    sa.Column("dec_center_deg", sa.Float, nullable=True),
    sa.Column("radius_deg", sa.Float, nullable=True),  # centre-to-corner footprint radius
    sa.Column("naxis1", sa.Integer, nullable=True),
    sa.Column("naxis2", sa.Integer, nullable=True),
    sa.Column("median_rms_jyb", sa.Float, nullable=True),
    sa.Column("n_sources", sa.Integer, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("file_size", sa.BigInteger, nullable=True),
    sa.Column("file_mtime", sa.Float, nullable=True),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("measured_at", sa.Float, nullable=True),
    # Recovery bookkeeping (added): the change time tells a rejected file that became readable;
    # a queued image belongs to the batch of one run request (the run's ``ese/batch`` tag);
    # attempts counts run requests, next_attempt_at is when a failed or orphaned image may be
    # requested again (exponential backoff).
    sa.Column("file_ctime", sa.Float, nullable=True),
    sa.Column("batch_token", sa.String(40), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("queued_at", sa.Float, nullable=True),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    # Error model of the image's measurements (added; core.noise_correlation): the factor its
    # errors were multiplied by (1: the beam assumption), the factor's uncertainty and the
    # source-free positions it was measured at (NULL when not measured), and why it was not.
    sa.Column("noise_corr_factor", sa.Float, nullable=True),
    sa.Column("noise_corr_err", sa.Float, nullable=True),
    sa.Column("noise_corr_positions", sa.Integer, nullable=True),
    sa.Column("noise_corr_reason", sa.Text, nullable=True),
    sa.CheckConstraint(sa.column("status").in_(IMAGE_STATUSES), name="ck_images_status"),
)
sa.Index("ix_images_night_status", images.c.night, images.c.status)
sa.Index("ix_images_status", images.c.status)

photometry = sa.Table(
    "photometry",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_path", sa.Text, nullable=False),
    sa.Column("ra_deg", sa.Float, nullable=False),
    sa.Column("dec_deg", sa.Float, nullable=False),
    sa.Column("nvss_flux_mjy", sa.Float, nullable=True),  # catalog flux
    sa.Column("peak_jyb", sa.Float, nullable=False),
    sa.Column("peak_err_jyb", sa.Float, nullable=True),
    sa.Column("measured_at", sa.Float, nullable=False),
    sa.Column("source_id", sa.Text, nullable=False),
    sa.Column("mjd", sa.Float, nullable=False),
    # Added by this project:
    sa.Column("local_rms_jyb", sa.Float, nullable=True),
    sa.Column("background_jyb", sa.Float, nullable=True),
    sa.Column("quality_flag", sa.Integer, nullable=False, server_default="0"),  # bit mask
    # peak_jyb / gain of the image and its error with the gain's (core.calibration); NULL until
    # the calibration step has run on the image's night
    sa.Column("normalized_flux_jy", sa.Float, nullable=True),
    sa.Column("normalized_flux_err_jy", sa.Float, nullable=True),
    sa.UniqueConstraint("image_path", "source_id", name="uq_photometry_image_source"),
)
sa.Index("ix_photometry_source_mjd", photometry.c.source_id, photometry.c.mjd)
sa.Index("ix_photometry_mjd", photometry.c.mjd)

variability_stats = sa.Table(
    "variability_stats",
    metadata,
    sa.Column("source_id", sa.Text, primary_key=True),
    sa.Column("ra_deg", sa.Float, nullable=False),
    sa.Column("dec_deg", sa.Float, nullable=False),
    sa.Column("nvss_flux_mjy", sa.Float, nullable=True),
    sa.Column("n_obs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("mean_flux_mjy", sa.Float, nullable=True),
    sa.Column("std_flux_mjy", sa.Float, nullable=True),
    sa.Column("min_flux_mjy", sa.Float, nullable=True),
    sa.Column("max_flux_mjy", sa.Float, nullable=True),
    sa.Column("chi2_nu", sa.Float, nullable=True),  # about the weighted mean
    sa.Column("sigma_deviation", sa.Float, nullable=True),
    sa.Column("eta_metric", sa.Float, nullable=True),
    sa.Column("last_measured_at", sa.Float, nullable=True),
    sa.Column("last_mjd", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    # Added by this project:
    sa.Column("weighted_mean_flux_mjy", sa.Float, nullable=True),
    sa.Column("v_index", sa.Float, nullable=True),  # modulation index s / mean
    sa.Column("median_flux_mjy", sa.Float, nullable=True),
    sa.Column("robust_std_mjy", sa.Float, nullable=True),  # 1.4826 * MAD
    sa.Column("dip_significance", sa.Float, nullable=True),  # signed: < 0 dip, > 0 spike
    sa.Column("dip_start_mjd", sa.Float, nullable=True),
    sa.Column("dip_end_mjd", sa.Float, nullable=True),
    sa.Column("dip_n_epochs", sa.Integer, nullable=True),
    sa.Column("dip_depth_frac", sa.Float, nullable=True),  # mean(window)/median - 1
    sa.Column("first_mjd", sa.Float, nullable=True),
    # Mooley et al. 2016 two-epoch metrics over the dip window: Vs and m of the pair of largest |m|
    # among pairs with |Vs| >= 4.3 (core.variability.two_epoch_extremes); NULL when none
    sa.Column("two_epoch_vs", sa.Float, nullable=True),
    sa.Column("two_epoch_m", sa.Float, nullable=True),
)


def _sums_columns() -> list[sa.Column]:
    """Columns shared by ``source_night_sums`` and ``source_sums`` (see core.sums).

    ``shift_mjy`` is the source's constant shift c (its catalog flux, 0 when unknown): the sums are
    of d = flux_mjy - c so that sums of squares do not cancel, and c never changes for a source, so
    sums of different nights add exactly. w = 1 / (err^2 + (flux_scale_error * f)^2); the
    ``flux_scale_error`` the weights were computed with is stored so a change of the setting is
    noticed (and the sums rebuilt) instead of mixing weights.
    """
    counts = [sa.Column(c, sa.Integer, nullable=False, server_default="0") for c in COUNT_COLUMNS]
    # Sums added later are nullable: ALTER TABLE gives the rows of an existing database NULL there
    # (and the pipeline rebuilds those sources' sums; core.sums.LATER_SUM_COLUMNS).
    sums = [
        sa.Column(c, sa.Float, nullable=c in LATER_SUM_COLUMNS)
        for c in SUM_COLUMNS
        if c not in COUNT_COLUMNS
    ]
    extremes = [
        sa.Column(c, sa.Float, nullable=True) for c in (*EXTREME_COLUMNS, "last_measured_at")
    ]
    return [
        sa.Column("shift_mjy", sa.Float, nullable=False),
        *counts,
        *sums,
        *extremes,
        sa.Column("flux_scale_error", sa.Float, nullable=False),
    ]


#: Partial sums of one source's epochs in one night (added by this project). Replaced whenever the
#: night's statistics stage runs, so the difference to the previous row is what changed.
source_night_sums = sa.Table(
    "source_night_sums",
    metadata,
    sa.Column("source_id", sa.Text, primary_key=True),
    sa.Column("night", sa.String(10), primary_key=True),
    *_sums_columns(),
)
sa.Index("ix_source_night_sums_night", source_night_sums.c.night)

#: The same sums over ALL nights of a source (added by this project): the whole-history moments of
#: variability_stats come from this one row, whatever the length of the history.
source_sums = sa.Table(
    "source_sums",
    metadata,
    sa.Column("source_id", sa.Text, primary_key=True),
    sa.Column("ra_deg", sa.Float, nullable=False),
    sa.Column("dec_deg", sa.Float, nullable=False),
    sa.Column("nvss_flux_mjy", sa.Float, nullable=True),
    *_sums_columns(),
)


#: Flux-scale calibration of each measured image (added by this project; core.calibration): the
#: gain, its error, the reference sources it rests on and their scatter, and whether the image is
#: bad (its photometry rows then carry quality bit FLAG_BAD_GAIN). Rewritten with its night by
#: the calibration step; ``computed_at`` is a processing time.
image_gains = sa.Table(
    "image_gains",
    metadata,
    sa.Column("image_path", sa.Text, primary_key=True),
    sa.Column("night", sa.String(10), nullable=False),
    sa.Column("mjd", sa.Float, nullable=True),
    sa.Column("gain", sa.Float, nullable=False),
    sa.Column("gain_err", sa.Float, nullable=True),
    sa.Column("n_ref", sa.Integer, nullable=False),
    sa.Column("ref_scatter", sa.Float, nullable=True),  # fractional, clipped weighted rms
    sa.Column("expected_scatter", sa.Float, nullable=True),  # what the errors predict
    sa.Column("calibrated", sa.Boolean, nullable=False),  # False: too few references, gain 1
    sa.Column("bad", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("computed_at", sa.Float, nullable=False),
)
sa.Index("ix_image_gains_night", image_gains.c.night)

#: The reference history (added by this project): one robust normalized flux per reference
#: candidate and night (core.calibration.nightly_reference_values), from which later nights'
#: baselines come (core.calibration.prior_baselines). Rewritten with its night.
calibration_references = sa.Table(
    "calibration_references",
    metadata,
    sa.Column("source_id", sa.Text, primary_key=True),
    sa.Column("night", sa.String(10), primary_key=True),
    sa.Column("flux_mjy", sa.Float, nullable=False),
    sa.Column("flux_err_mjy", sa.Float, nullable=True),
    sa.Column("n_images", sa.Integer, nullable=False),
)
sa.Index("ix_calibration_references_night", calibration_references.c.night)


# Candidate statuses and which of them are open: ese_assets.core.candidates (the workflow rule).
ese_candidates = sa.Table(
    "ese_candidates",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source_id", sa.Text, sa.ForeignKey("variability_stats.source_id"), nullable=False),
    sa.Column("flagged_at", sa.Float, nullable=False),
    sa.Column("flagged_by", sa.Text, nullable=False, server_default="auto"),
    sa.Column("significance", sa.Float, nullable=False),
    sa.Column("flag_type", sa.Text, nullable=False),
    sa.Column("notes", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="active"),
    sa.Column("investigated_at", sa.Float, nullable=True),
    sa.Column("dismissed_at", sa.Float, nullable=True),
    # Added by this project:
    sa.Column("night", sa.String(10), nullable=True),  # partition that first flagged it
    sa.Column("last_night", sa.String(10), nullable=True),  # partition that last confirmed it
    sa.Column("sigma_deviation", sa.Float, nullable=True),
    sa.Column("dip_significance", sa.Float, nullable=True),
    sa.CheckConstraint(
        sa.column("status").in_(CANDIDATE_STATUSES), name="ck_ese_candidates_status"
    ),
)
sa.Index("ix_ese_candidates_source", ese_candidates.c.source_id)
# At most one open candidate per source (partial unique index; SQLite >= 3.8 and PostgreSQL).
_OPEN = ese_candidates.c.status.in_(OPEN_STATUSES)
sa.Index(
    "uq_ese_candidates_open_source",
    ese_candidates.c.source_id,
    unique=True,
    sqlite_where=_OPEN,
    postgresql_where=_OPEN,
)

#: Every change of a candidate's status (added by this project), written in the transaction of the
#: change: by a person (``run_id`` NULL) or a detection run (``run_id``: the Dagster run id, or a
#: generated ``cli-``/``api-`` id). ``old_status`` NULL: the candidate was created; ``new_status``
#: NULL: it was removed (undo of the run that created it). ``previous`` (JSON) holds the
#: candidate's detection columns before the change (a removed candidate: its whole row), which is
#: what undoing a run restores; an undo's own entries name the run they undid (``undoes``). No
#: foreign key: the history outlives candidates removed by undo.
ese_candidate_history = sa.Table(
    "ese_candidate_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("candidate_id", sa.Integer, nullable=False),
    sa.Column("source_id", sa.Text, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("changed_by", sa.Text, nullable=False),
    sa.Column("old_status", sa.String(16), nullable=True),
    sa.Column("new_status", sa.String(16), nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("undoes", sa.Text, nullable=True),  # entries of an undo: the run id it undid
    sa.Column("significance", sa.Float, nullable=True),  # after the change
    sa.Column("previous", sa.Text, nullable=True),
)
sa.Index("ix_ese_candidate_history_candidate", ese_candidate_history.c.candidate_id)
sa.Index("ix_ese_candidate_history_source", ese_candidate_history.c.source_id)
sa.Index("ix_ese_candidate_history_run", ese_candidate_history.c.run_id)

"""ESE candidate flagging from per-source variability metrics, and the pure candidate workflow.

Two rules (both need at least ``min_obs`` epochs):

* sigma rule (the seed system's): ``sigma_deviation >= min_sigma``, thresholds from the user-guide
  presets :data:`PRESETS` (conservative 5.0, moderate 3.5, sensitive 3.0). With the sample std,
  ``sigma_deviation <= (N - 1)/sqrt(N)`` (:func:`max_sigma_deviation`), so the rule cannot fire
  below 27 / 15 / 11 epochs for those presets, and it misses dips covering more than a few epochs.
* dip rule: ``|dip_significance| >= min_dip_sigma`` (windowed matched-filter statistic of
  :mod:`ese_assets.core.variability`); negative values are dips, positive ones spikes.
  The default ``min_dip_sigma = 6.0`` is calibrated on pure Gaussian-noise lightcurves (N = 20 to
  10000 epochs, heteroscedastic errors, ~4e5 simulated constant sources): none reached |S| >= 6,
  while P(|S| >= 5.5) rises to 3.5e-4 at N = 2000 and 1e-3 at N = 5000; extrapolated, the
  false-alarm rate at 6 is ~1e-5 to 1e-4 per constant source (numbers in the docstring of
  :mod:`ese_assets.core.variability`). At ESE rates of ~0.017 per source-year false-alarm control
  dominates (science brief section 4). A 30 % dip over 15 epochs is detected at per-epoch S/N 20
  (S ~ 18) and, 99 % of the time, at S/N 8 (S ~ 8).

Composite score (seed's ``use_composite_scoring``): :func:`composite_score`.

Candidate workflow (``ese_candidates.status`` in active / investigated / dismissed):
:func:`plan_candidate_changes` turns this night's flagged sources and the existing candidate rows
into row inserts and updates, without touching the database itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Seed user-guide presets for the sigma_deviation threshold.
PRESETS: dict[str, float] = {"conservative": 5.0, "moderate": 3.5, "sensitive": 3.0}

#: Default preset when neither a preset nor a custom threshold is given.
DEFAULT_PRESET = "conservative"

#: Calibrated default threshold on |dip_significance| (false-alarm rate << 1e-3 per constant source).
DEFAULT_MIN_DIP_SIGMA = 6.0

#: Candidate statuses counted as open (at most one open row per source in the database).
OPEN_STATUSES = ("active", "investigated")

_FLAGGED_COLUMNS = ["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"]


def resolve_min_sigma(preset: str | None = None, min_sigma: float | None = None) -> float:
    """The sigma_deviation threshold from a preset name and/or a custom value.

    ``min_sigma`` (when given) overrides the preset; with neither, the conservative preset (5.0).
    Preset names are case-insensitive. Raises ValueError for an unknown preset or a non-positive /
    non-finite ``min_sigma``.
    """
    if preset is not None:
        key = str(preset).strip().lower()
        if key not in PRESETS:
            valid = ", ".join(f"{k} ({v:g})" for k, v in PRESETS.items())
            raise ValueError(f"unknown detection preset {preset!r}; valid presets: {valid}")
    if min_sigma is not None:
        value = float(min_sigma)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"min_sigma must be a finite number > 0, got {min_sigma!r}")
        return value
    return PRESETS[DEFAULT_PRESET if preset is None else str(preset).strip().lower()]


def max_sigma_deviation(n_obs):
    """Largest possible ``sigma_deviation`` with N epochs: ``(N - 1) / sqrt(N)``.

    Samuelson's inequality: for any sample, ``|x_i - mean| <= s * (N - 1)/sqrt(N)`` with s the
    ddof=1 standard deviation; equality for N - 1 equal values and one outlier. NaN for N < 1.
    Accepts scalars or arrays (returns a float for a scalar).
    """
    n = np.asarray(n_obs, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n >= 1, (n - 1.0) / np.sqrt(n), np.nan)
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class DetectionSettings:
    """Thresholds of :func:`flag_candidates`.

    ``min_sigma``: sigma_deviation threshold (presets via :meth:`from_preset`);
    ``min_dip_sigma``: |dip_significance| threshold; ``min_obs``: epochs needed by either rule;
    ``use_sigma_rule`` / ``use_dip_rule``: switch the rules on or off.
    """

    min_sigma: float = 5.0
    min_dip_sigma: float = DEFAULT_MIN_DIP_SIGMA
    min_obs: int = 10
    use_sigma_rule: bool = True
    use_dip_rule: bool = True

    def __post_init__(self) -> None:
        for name in ("min_sigma", "min_dip_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DetectionSettings.{name} must be a finite number > 0, got {value!r}")
        if int(self.min_obs) != self.min_obs or self.min_obs < 1:
            raise ValueError(f"DetectionSettings.min_obs must be an integer >= 1, got {self.min_obs!r}")

    @classmethod
    def from_preset(cls, preset: str | None = None, min_sigma: float | None = None,
                    **kwargs) -> DetectionSettings:
        """Settings whose ``min_sigma`` comes from :func:`resolve_min_sigma`."""
        return cls(min_sigma=resolve_min_sigma(preset, min_sigma), **kwargs)


def flag_candidates(stats: pd.DataFrame, settings: DetectionSettings | None = None) -> pd.DataFrame:
    """Sources that pass the detection rules.

    ``stats`` needs ``source_id, n_obs, sigma_deviation, dip_significance`` (the output of
    :func:`ese_assets.core.variability.variability_metrics` or the ``variability_stats`` table).
    Rules (each requires ``n_obs >= min_obs``; NaN never passes):
    sigma rule ``sigma_deviation >= min_sigma``; dip rule ``|dip_significance| >= min_dip_sigma``,
    named "dip" for negative and "spike" for positive dip_significance.

    Returns a DataFrame (flagged sources only, input order) with columns ``source_id,
    significance, flag_type, sigma_deviation, dip_significance``; ``flag_type`` is the fired rules
    joined with "+" (e.g. "sigma_deviation+dip"); ``significance`` is the largest value among the
    rules that fired (sigma_deviation, |dip_significance|).
    """
    settings = settings or DetectionSettings()
    n_obs = pd.to_numeric(stats["n_obs"]).to_numpy(dtype=np.float64, na_value=np.nan)
    sigma_dev = pd.to_numeric(stats["sigma_deviation"]).to_numpy(dtype=np.float64, na_value=np.nan)
    dip = pd.to_numeric(stats["dip_significance"]).to_numpy(dtype=np.float64, na_value=np.nan)
    enough = n_obs >= settings.min_obs
    with np.errstate(invalid="ignore"):
        sig_fire = enough & (sigma_dev >= settings.min_sigma) & settings.use_sigma_rule
        dip_fire = enough & (np.abs(dip) >= settings.min_dip_sigma) & settings.use_dip_rule
    flagged = sig_fire | dip_fire

    significance = np.fmax(np.where(sig_fire, sigma_dev, np.nan), np.where(dip_fire, np.abs(dip), np.nan))
    sig_name = np.where(sig_fire, "sigma_deviation", "")
    dip_name = np.where(dip_fire, np.where(dip < 0, "dip", "spike"), "")
    sep = np.where(sig_fire & dip_fire, "+", "")
    flag_type = np.char.add(np.char.add(sig_name, sep), dip_name)

    out = pd.DataFrame(
        {
            "source_id": stats["source_id"].iloc[np.flatnonzero(flagged)].reset_index(drop=True),
            "significance": significance[flagged],
            "flag_type": pd.Series(flag_type[flagged], dtype="str"),
            "sigma_deviation": sigma_dev[flagged],
            "dip_significance": dip[flagged],
        }
    )
    return out


def composite_score(sigma_deviation, chi2_nu, eta):
    """Seed composite score and confidence class, vectorized over arrays.

    Each metric is clipped and scaled to [0, 1]: sigma_deviation and chi2_nu over [0, 10], eta over
    [0, 5]; ``score = 10 * (0.5 s + 0.3 c + 0.2 e)`` (weights sum to 1, so the weighted mean x 10,
    range [0, 10]). Confidence "high" for score >= 7, "medium" for >= 4, else "low".
    A NaN metric gives a NaN score and "low" confidence.
    Returns ``(score, confidence)``: float arrays / str arrays of the broadcast shape, or a float and
    a str when all inputs are scalars.
    """
    s = np.clip(np.asarray(sigma_deviation, dtype=np.float64), 0.0, 10.0) / 10.0
    c = np.clip(np.asarray(chi2_nu, dtype=np.float64), 0.0, 10.0) / 10.0
    e = np.clip(np.asarray(eta, dtype=np.float64), 0.0, 5.0) / 5.0
    score = 10.0 * (0.5 * s + 0.3 * c + 0.2 * e)
    with np.errstate(invalid="ignore"):
        confidence = np.where(score >= 7.0, "high", np.where(score >= 4.0, "medium", "low"))
    if score.ndim == 0:
        return float(score), str(confidence)
    return score, confidence


def _py(value):
    """Plain Python scalar for a database row (NaN/NA -> None)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def _latest_night(previous, night: str | None) -> str | None:
    """The later of two ``YYYY-MM-DD`` nights (ISO dates sort as strings); None/NaN ignored."""
    known = [n for n in (previous, night) if isinstance(n, str) and n]
    return max(known) if known else None


def plan_candidate_changes(
    flagged: pd.DataFrame,
    existing: pd.DataFrame | None,
    *,
    night: str | None,
    now: float,
    regrow_factor: float = 1.25,
) -> tuple[list[dict], list[dict]]:
    """Decide candidate-table inserts and updates for this night's flagged sources (pure function).

    ``flagged``: output of :func:`flag_candidates`. ``existing``: all ``ese_candidates`` rows of the
    flagged sources, columns ``id, source_id, status, significance, dismissed_at`` (may be empty or
    None). Per flagged source:

    * an open candidate (status active or investigated) exists -> update it: keys ``id,
      significance, flag_type, sigma_deviation, dip_significance, last_night``; the status is left
      alone (an investigated candidate stays investigated). ``last_night`` is the latest night that
      confirmed the candidate (``existing`` may carry it), so re-running an older night (a backfill)
      does not move it backwards. Should several open rows exist (legacy
      data), the most recent one (largest id) is updated.
    * no open candidate, the most recent row (largest id) is dismissed -> nothing, unless
      ``significance >= regrow_factor * dismissed significance``; then insert a new active row whose
      notes say why (the person's dismissal is respected unless the signal grows).
    * no candidate rows -> insert ``source_id, flagged_at=now, flagged_by="auto", significance,
      flag_type, status="active", night, last_night=night, sigma_deviation, dip_significance,
      notes=None``.

    Sources not flagged tonight are left alone (people resolve open candidates). Idempotent: after
    the inserts are applied, planning the same flagged set again yields only updates with the same
    values. Returns ``(inserts, updates)``, lists of dicts of plain Python values (NaN -> None).
    """
    if not regrow_factor > 0:
        raise ValueError(f"regrow_factor must be > 0, got {regrow_factor!r}")
    inserts: list[dict] = []
    updates: list[dict] = []
    if flagged is None or len(flagged) == 0:
        return inserts, updates
    flagged = flagged[_FLAGGED_COLUMNS].drop_duplicates("source_id", keep="last")
    flagged = flagged.assign(source_id=flagged["source_id"].astype(object))

    if existing is None or len(existing) == 0:
        existing = pd.DataFrame({"id": pd.Series([], dtype="int64"),
                                 "source_id": pd.Series([], dtype=object),
                                 "status": pd.Series([], dtype=object),
                                 "significance": pd.Series([], dtype="float64")})
    if "last_night" not in existing:
        existing = existing.assign(last_night=None)
    ex = existing[["id", "source_id", "status", "significance", "last_night"]].copy()
    ex["source_id"] = ex["source_id"].astype(object)
    ex = ex.sort_values("id", kind="stable")
    is_open = ex["status"].isin(OPEN_STATUSES)
    # Most recent open row per source, and most recent row of any status per source.
    open_rows = ex[is_open].drop_duplicates("source_id", keep="last")
    latest = ex.drop_duplicates("source_id", keep="last")

    merged = flagged.merge(
        open_rows[["source_id", "id", "last_night"]].rename(
            columns={"id": "open_id", "last_night": "open_last_night"}), on="source_id", how="left"
    ).merge(
        latest[["source_id", "id", "status", "significance"]].rename(
            columns={"id": "latest_id", "status": "latest_status", "significance": "latest_sig"}),
        on="source_id", how="left",
    )
    has_open = merged["open_id"].notna()
    has_any = merged["latest_id"].notna()
    # No open row but some rows: every row is dismissed (the schema allows three statuses).
    regrow = has_any & ~has_open & (merged["significance"] >= regrow_factor * merged["latest_sig"])
    insert = ~has_any | regrow

    for rec in merged[has_open].to_dict("records"):
        updates.append({
            "id": int(rec["open_id"]),
            "significance": _py(rec["significance"]),
            "flag_type": _py(rec["flag_type"]),
            "sigma_deviation": _py(rec["sigma_deviation"]),
            "dip_significance": _py(rec["dip_significance"]),
            "last_night": _latest_night(rec["open_last_night"], night),
        })

    for rec, again in zip(merged[insert].to_dict("records"), regrow[insert]):
        notes = None
        if again:
            notes = (
                f"re-flagged after dismissal: significance {rec['significance']:.2f} >= "
                f"{regrow_factor:g} x {rec['latest_sig']:.2f} of dismissed candidate "
                f"id {int(rec['latest_id'])}"
            )
        inserts.append({
            "source_id": _py(rec["source_id"]),
            "flagged_at": float(now),
            "flagged_by": "auto",
            "significance": _py(rec["significance"]),
            "flag_type": _py(rec["flag_type"]),
            "status": "active",
            "night": night,
            "last_night": night,
            "sigma_deviation": _py(rec["sigma_deviation"]),
            "dip_significance": _py(rec["dip_significance"]),
            "notes": notes,
        })
    return inserts, updates

"""ESE candidate flagging from per-source variability metrics.

Two rules (both need at least ``min_obs`` epochs):

* sigma rule (the seed system's, OFF by default: :data:`DEFAULT_USE_SIGMA_RULE`):
  ``sigma_deviation >= min_sigma``, thresholds from the user-guide presets :data:`PRESETS`
  (conservative 5.0, moderate 3.5, sensitive 3.0). It is switched on when a preset or a custom
  threshold is given explicitly (:func:`sigma_rule_requested`). Why off: ``sigma_deviation`` is
  the distance of the single most extreme epoch from the mean, so one bad image or one outlying
  epoch fires it on its own; its flags are named ``outlier``. With the sample std,
  ``sigma_deviation <= (N - 1)/sqrt(N)`` (:func:`max_sigma_deviation`), so the rule cannot fire
  below 27 / 15 / 11 epochs for those presets, and it misses dips covering more than a few epochs.
* dip rule: ``|dip_significance| >= min_dip_sigma`` (windowed matched-filter statistic of
  :mod:`ese_assets.core.variability`); negative values are dips, positive ones spikes.
  The default ``min_dip_sigma = 6.0`` is calibrated on pure Gaussian-noise lightcurves (N = 20 to
  10000 epochs, heteroscedastic errors, ~4e5 simulated constant sources): none reached |S| >= 6,
  while P(|S| >= 5.5) rises to 3.5e-4 at N = 2000 and 1e-3 at N = 5000; extrapolated, the
  false-alarm rate at 6 is ~1e-5 to 1e-4 per constant source (numbers in the docstring of
  :mod:`ese_assets.core.variability`). At ESE rates of ~0.017 per source-year (Fiedler et al.
  1994) real events are rare among 10^4 monitored sources, so false-alarm control dominates.
  A 30 % dip over 15 epochs is detected at per-epoch S/N 20 (S ~ 18) and, 99 % of the time, at
  S/N 8 (S ~ 8).

``flag_type`` names what fired, joined with "+" when several did: ``dip`` / ``spike`` (the dip
rule, by the sign of ``dip_significance``), ``outlier`` (the seed's sigma rule: one epoch far from
the mean) and ``variable`` (the eta-V population cut of :func:`eta_v_flags`, a comparison rule
that is not part of the default).

A single outlying epoch never makes a candidate by default: the dip scan clips each epoch's z at 5
and needs windows of >= 3 epochs, so one epoch adds at most 5/sqrt(3) = 2.9 < 6 to the statistic.

Composite score (seed's ``use_composite_scoring``): :func:`composite_score`.

The candidate workflow (what happens to flagged sources' rows) is :mod:`ese_assets.core.candidates`.
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

#: Default sigma_deviation threshold: the default preset's.
DEFAULT_MIN_SIGMA = PRESETS[DEFAULT_PRESET]

#: Calibrated default threshold on |dip_significance| (false-alarm rate << 1e-3 per constant
#: source).
DEFAULT_MIN_DIP_SIGMA = 6.0

#: Default minimum number of epochs before either rule can flag a source.
DEFAULT_MIN_OBS = 10

#: Whether the seed's sigma_deviation rule creates candidates when nobody asked for it: no, it
#: fires on a single outlying epoch. A preset or threshold given explicitly switches it on.
DEFAULT_USE_SIGMA_RULE = False

#: flag_type names of the rules (joined with "+" when several fire).
FLAG_OUTLIER = "outlier"
FLAG_DIP = "dip"
FLAG_SPIKE = "spike"
FLAG_VARIABLE = "variable"

#: Default k of the eta-V cut: a source is flagged when log10(eta) and log10(V) both exceed the
#: population's mean + k * std (Rowlinson et al. 2019 use ~1.5-2 sigma as a starting point).
DEFAULT_ETA_V_SIGMA = 2.0


def sigma_rule_requested(
    preset: str | None = None, min_sigma: float | None = None, use_sigma_rule: bool | None = None
) -> bool:
    """Whether the seed's sigma_deviation rule runs: ``use_sigma_rule`` when given, else True when
    a ``preset`` or a ``min_sigma`` was given explicitly, else :data:`DEFAULT_USE_SIGMA_RULE`."""
    if use_sigma_rule is not None:
        return bool(use_sigma_rule)
    return preset is not None or min_sigma is not None or DEFAULT_USE_SIGMA_RULE


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
    ``use_sigma_rule`` / ``use_dip_rule``: switch the rules on or off (the sigma rule is off unless
    asked for, :data:`DEFAULT_USE_SIGMA_RULE`).
    """

    min_sigma: float = DEFAULT_MIN_SIGMA
    min_dip_sigma: float = DEFAULT_MIN_DIP_SIGMA
    min_obs: int = DEFAULT_MIN_OBS
    use_sigma_rule: bool = DEFAULT_USE_SIGMA_RULE
    use_dip_rule: bool = True

    def __post_init__(self) -> None:
        for name in ("min_sigma", "min_dip_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"DetectionSettings.{name} must be a finite number > 0, got {value!r}"
                )
        if int(self.min_obs) != self.min_obs or self.min_obs < 1:
            raise ValueError(
                f"DetectionSettings.min_obs must be an integer >= 1, got {self.min_obs!r}"
            )

    @classmethod
    def from_preset(
        cls, preset: str | None = None, min_sigma: float | None = None, **kwargs
    ) -> DetectionSettings:
        """Settings whose ``min_sigma`` comes from :func:`resolve_min_sigma`; the sigma rule is on
        when a preset or threshold is given (:func:`sigma_rule_requested`) unless ``kwargs`` say
        otherwise."""
        kwargs.setdefault("use_sigma_rule", sigma_rule_requested(preset, min_sigma))
        return cls(min_sigma=resolve_min_sigma(preset, min_sigma), **kwargs)


def flag_candidates(stats: pd.DataFrame, settings: DetectionSettings | None = None) -> pd.DataFrame:
    """Sources that pass the detection rules.

    ``stats`` needs ``source_id, n_obs, sigma_deviation, dip_significance`` (the output of
    :func:`ese_assets.core.variability.variability_metrics` or the ``variability_stats`` table).
    Rules (each requires ``n_obs >= min_obs``; NaN never passes):
    sigma rule ``sigma_deviation >= min_sigma`` (only with ``use_sigma_rule``), named "outlier";
    dip rule ``|dip_significance| >= min_dip_sigma``, named "dip" for negative and "spike" for
    positive dip_significance.

    Returns a DataFrame (flagged sources only, input order) with columns ``source_id,
    significance, flag_type, sigma_deviation, dip_significance``; ``flag_type`` is the fired rules
    joined with "+" (e.g. "outlier+dip"); ``significance`` is the largest value among the
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

    significance = np.fmax(
        np.where(sig_fire, sigma_dev, np.nan), np.where(dip_fire, np.abs(dip), np.nan)
    )
    sig_name = np.where(sig_fire, FLAG_OUTLIER, "")
    dip_name = np.where(dip_fire, np.where(dip < 0, FLAG_DIP, FLAG_SPIKE), "")
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


def eta_v_flags(
    stats: pd.DataFrame, *, k_sigma: float = DEFAULT_ETA_V_SIGMA, min_obs: int = DEFAULT_MIN_OBS
) -> pd.DataFrame:
    """The eta-V population cut (Rowlinson et al. 2019, A&C 27, 111), for comparison.

    Over the sources with ``n_obs >= min_obs`` and finite, positive ``eta_metric`` and
    ``v_index`` (the population), with ``x = log10(eta)`` and ``y = log10(V)``: a source is
    flagged when ``x > mean(x) + k_sigma * std(x)`` AND ``y > mean(y) + k_sigma * std(y)`` (std
    with ddof=1). The thresholds come from the population, so the cut flags roughly the same
    fraction of any population whatever its noise: it finds the most variable sources of a
    field, not ESEs. ``flag_type`` is ``variable``; ``significance`` is the smaller of the two
    distances above the means in units of their std. Fewer than 3 sources in the population
    flag nothing.

    Returns the flagged rows (input order) with columns ``source_id, significance, flag_type,
    eta_metric, v_index, log_eta_threshold, log_v_threshold``.
    """
    if not (math.isfinite(k_sigma)):
        raise ValueError(f"k_sigma must be a finite number, got {k_sigma!r}")
    n_obs = pd.to_numeric(stats["n_obs"]).to_numpy(dtype=np.float64, na_value=np.nan)
    eta = pd.to_numeric(stats["eta_metric"]).to_numpy(dtype=np.float64, na_value=np.nan)
    v = pd.to_numeric(stats["v_index"]).to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        member = (n_obs >= min_obs) & (eta > 0) & (v > 0) & np.isfinite(eta) & np.isfinite(v)
        x = np.where(member, np.log10(eta), np.nan)
        y = np.where(member, np.log10(v), np.nan)
    if member.sum() < 3:
        flagged = np.zeros(len(stats), dtype=bool)
        x_cut = y_cut = np.nan
        zx = zy = np.full(len(stats), np.nan)
    else:
        mx, sx = np.nanmean(x), np.nanstd(x, ddof=1)
        my, sy = np.nanmean(y), np.nanstd(y, ddof=1)
        x_cut, y_cut = mx + k_sigma * sx, my + k_sigma * sy
        with np.errstate(invalid="ignore", divide="ignore"):
            flagged = member & (x > x_cut) & (y > y_cut)
            zx, zy = (x - mx) / sx, (y - my) / sy
    idx = np.flatnonzero(flagged)
    return pd.DataFrame(
        {
            "source_id": stats["source_id"].iloc[idx].reset_index(drop=True),
            "significance": np.fmin(zx, zy)[idx],
            "flag_type": pd.Series([FLAG_VARIABLE] * len(idx), dtype="str"),
            "eta_metric": eta[idx],
            "v_index": v[idx],
            "log_eta_threshold": np.full(len(idx), x_cut),
            "log_v_threshold": np.full(len(idx), y_cut),
        }
    )


def composite_score(sigma_deviation, chi2_nu, eta):
    """Seed composite score and confidence class, vectorized over arrays.

    Each metric is clipped and scaled to [0, 1]: sigma_deviation and chi2_nu over [0, 10], eta over
    [0, 5]; ``score = 10 * (0.5 s + 0.3 c + 0.2 e)`` (weights sum to 1, so the weighted mean x 10,
    range [0, 10]). Confidence "high" for score >= 7, "medium" for >= 4, else "low".
    A NaN metric gives a NaN score and "low" confidence.
    Returns ``(score, confidence)``: float arrays / str arrays of the broadcast shape, or a float
    and a str when all inputs are scalars.
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

"""Relative lightcurves: a source's flux divided by an ensemble of its stable neighbours measured
in the same images (the seed's ``Source.calculate_relative_lightcurve``).

Why: a flux-scale error of an image (the ~2 % image-to-image scatter, or 10-20 % for a badly
calibrated image) multiplies every source of the image alike, so it cancels in the ratio of a
source to its neighbours. This is the per-source analogue of the per-image gains of
:mod:`ese_assets.core.calibration`: those use one ensemble of references for the whole image,
here the ensemble is the target's own neighbourhood (which also follows flux-scale errors that
vary slowly across the field) and the answer is one source's lightcurve. An ESE is intrinsic to
one line of sight, so it stays in the target's relative lightcurve.

Inputs (long tables, any order): the target's measurements ``image_id, mjd, flux_jy,
flux_err_jy``; the neighbours' measurements ``source_id, image_id, flux_jy, flux_err_jy``; the
candidate neighbours ``source_id, sep_deg, eta`` (angular separation from the target, and VAST's
eta of their history, :mod:`ese_assets.core.variability`). Rows whose flux is not finite or whose
error is not finite and > 0 are ignored. Notation: target flux ``F_j +- e_j`` in image j;
neighbour k flux ``F_kj +- e_kj``.

1. **Stable neighbours**: candidates other than the target with ``sep_deg <= radius_deg`` and a
   finite ``eta <= max_eta`` (no eta: no history to call it stable, excluded), measured in at least
   ``max(MIN_NEIGHBOR_EPOCHS, ceil(min_common_fraction * N))`` of the target's N images, with a
   median flux ``m_k = median_j F_kj`` over those common images > 0 and a median S/N
   ``m_k / median_j e_kj >= min_neighbor_snr`` (a noise-dominated median would make ``F_kj / m_k``
   heavy-tailed).
2. **Ranking**: by the neighbour's median fractional error ``s_k = median_j e_kj / m_k``
   ascending (its weight in the ensemble, largest first), ties by separation; ``rank`` 1 is the
   best. ``max_neighbors`` (None: all) keeps the first ones.
3. **Ensemble per image**: normalized fluxes ``n_kj = F_kj / m_k +- s_kj = e_kj / m_k``; fixed
   per-neighbour weights ``w_k = 1 / s_k^2`` (per-epoch weights would favour a neighbour's bright
   epochs and bias the ensemble up); over the neighbours K_j measured in image j,
   ``E_j = sum_K_j w_k n_kj / W_j`` with ``W_j = sum_K_j w_k``, and
   ``sigma_E,j = sqrt(sum_K_j w_k^2 s_kj^2) / W_j``.
4. **Alignment by image**: only images in which the target and at least ``min_neighbors`` of the
   kept neighbours are measured (the others are counted in ``n_images_dropped``).
5. **Relative flux** (in the target's flux unit; the ensemble is dimensionless and ~1):
   ``R_j = F_j / E_j``, ``sigma_R,j = sqrt((e_j / E_j)^2 + (F_j sigma_E,j / E_j^2)^2)`` (first-order
   propagation, the target's and the ensemble's errors independent).

Fewer than ``min_neighbors`` stable neighbours, or no image with enough of them, raises ValueError
with one line naming the source and what was found. Vectorized: group reductions over the long
table, no loop over neighbours or images.

References: the ensemble ("comparison star") normalization of differential photometry, e.g.
Honeycutt 1992 (PASP 104, 435); VAST's eta, Murphy et al. 2021 (PASA 38, e054).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: The seed's defaults of ``calculate_relative_lightcurve(radius_deg, max_eta, min_neighbors)``.
DEFAULT_RADIUS_DEG = 0.5
DEFAULT_MAX_ETA = 1.5
DEFAULT_MIN_NEIGHBORS = 3
#: A neighbour must be measured in at least this fraction of the target's images (its median is
#: then a median over most of the same epochs as the target's) ...
DEFAULT_MIN_COMMON_FRACTION = 0.5
#: ... and in at least this many of them (a median of fewer is no baseline).
MIN_NEIGHBOR_EPOCHS = 3
#: A neighbour's median flux over its median error must reach this.
DEFAULT_MIN_NEIGHBOR_SNR = 3.0

TARGET_COLUMNS = ("image_id", "mjd", "flux_jy", "flux_err_jy")
NEIGHBOR_COLUMNS = ("source_id", "image_id", "flux_jy", "flux_err_jy")
CANDIDATE_COLUMNS = ("source_id", "sep_deg", "eta")

#: Columns of :attr:`RelativeLightcurve.epochs`, in order (one row per aligned image, by mjd).
EPOCH_COLUMNS = (
    "image_id",
    "mjd",
    "flux_jy",
    "flux_err_jy",
    "ensemble",
    "ensemble_err",
    "relative_flux_jy",
    "relative_flux_err_jy",
    "n_neighbors",
)
#: Columns of :attr:`RelativeLightcurve.neighbors`, in order (one row per kept neighbour, by rank).
NEIGHBOR_RESULT_COLUMNS = (
    "rank",
    "source_id",
    "sep_deg",
    "eta",
    "n_epochs",
    "median_flux_jy",
    "median_frac_err",
    "weight",
)


@dataclass(frozen=True)
class RelativeLightcurve:
    """A relative lightcurve: ``epochs`` (:data:`EPOCH_COLUMNS`), the ``neighbors`` in its ensemble
    (:data:`NEIGHBOR_RESULT_COLUMNS`; ``weight`` = ``w_k / sum w``), ``n_images_dropped`` (target
    images with fewer than ``min_neighbors`` neighbours measured) and ``excluded`` (candidates in
    the cone left out, by reason: ``variable``, ``no_eta``, ``few_epochs``, ``faint``,
    ``beyond_max_neighbors``)."""

    source_id: str
    epochs: pd.DataFrame
    neighbors: pd.DataFrame
    n_images_dropped: int
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def neighbor_ids(self) -> list[str]:
        return self.neighbors["source_id"].tolist()


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"relative_lightcurve: {what} has no column(s) {missing}")


def _clean(frame: pd.DataFrame) -> pd.DataFrame:
    flux = frame["flux_jy"].to_numpy(float)
    err = frame["flux_err_jy"].to_numpy(float)
    return frame[np.isfinite(flux) & np.isfinite(err) & (err > 0)]


def relative_lightcurve(
    target: pd.DataFrame,
    neighbors: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    radius_deg: float = DEFAULT_RADIUS_DEG,
    max_eta: float = DEFAULT_MAX_ETA,
    min_neighbors: int = DEFAULT_MIN_NEIGHBORS,
    max_neighbors: int | None = None,
    min_common_fraction: float = DEFAULT_MIN_COMMON_FRACTION,
    min_neighbor_snr: float = DEFAULT_MIN_NEIGHBOR_SNR,
    source_id: str = "target",
) -> RelativeLightcurve:
    """The relative lightcurve of ``source_id`` (see the module docstring for the formulas).

    ``target``: :data:`TARGET_COLUMNS`; ``neighbors``: :data:`NEIGHBOR_COLUMNS`; ``candidates``:
    :data:`CANDIDATE_COLUMNS` (rows naming ``source_id`` itself are ignored). Fluxes in one unit
    (named Jy here); ``image_id`` any hashable key shared by the two measurement tables.
    """
    _require(target, TARGET_COLUMNS, "target")
    _require(neighbors, NEIGHBOR_COLUMNS, "neighbors")
    _require(candidates, CANDIDATE_COLUMNS, "candidates")
    if min_neighbors < 1:
        raise ValueError(f"relative_lightcurve: min_neighbors must be >= 1, not {min_neighbors}")
    if not radius_deg > 0:
        raise ValueError(f"relative_lightcurve: radius_deg must be > 0, not {radius_deg}")

    tgt = _clean(target[list(TARGET_COLUMNS)]).drop_duplicates("image_id")
    n_target = len(tgt)
    if n_target == 0:
        raise ValueError(f"source {source_id!r}: no usable measurements")

    cand = candidates[list(CANDIDATE_COLUMNS)].drop_duplicates("source_id")
    cand = cand[(cand["source_id"] != source_id) & (cand["sep_deg"].to_numpy(float) <= radius_deg)]
    eta = cand["eta"].to_numpy(float)
    no_eta = ~np.isfinite(eta)
    variable = ~no_eta & (eta > max_eta)
    excluded = {"variable": int(variable.sum()), "no_eta": int(no_eta.sum())}
    stable = cand[~no_eta & ~variable].set_index("source_id")

    rows = _clean(neighbors[list(NEIGHBOR_COLUMNS)])
    rows = rows[rows["source_id"].isin(stable.index) & rows["image_id"].isin(tgt["image_id"])]
    rows = rows.drop_duplicates(["source_id", "image_id"])
    per = rows.groupby("source_id", sort=True).agg(
        n_epochs=("flux_jy", "size"),
        median_flux_jy=("flux_jy", "median"),
        median_err_jy=("flux_err_jy", "median"),
    )
    per = per.reindex(stable.index, fill_value=0)
    min_epochs = max(MIN_NEIGHBOR_EPOCHS, math.ceil(min_common_fraction * n_target))
    few = per["n_epochs"].to_numpy() < min_epochs
    median = per["median_flux_jy"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = median / per["median_err_jy"].to_numpy(float)
    faint = ~few & ~(np.isfinite(snr) & (median > 0) & (snr >= min_neighbor_snr))
    excluded.update(few_epochs=int(few.sum()), faint=int(faint.sum()))

    kept = per[~few & ~faint].join(stable)
    kept["median_frac_err"] = kept["median_err_jy"] / kept["median_flux_jy"]
    kept = kept.reset_index().sort_values(
        ["median_frac_err", "sep_deg", "source_id"], kind="mergesort"
    )
    if max_neighbors is not None and len(kept) > max_neighbors:
        excluded["beyond_max_neighbors"] = len(kept) - int(max_neighbors)
        kept = kept.iloc[: int(max_neighbors)]
    else:
        excluded["beyond_max_neighbors"] = 0

    if len(kept) < min_neighbors:
        raise ValueError(
            f"source {source_id!r}: {len(kept)} stable neighbour(s) within {radius_deg:g} deg "
            f"(eta <= {max_eta:g}, measured in >= {min_epochs} of its {n_target} images, "
            f"S/N >= {min_neighbor_snr:g}), {min_neighbors} needed; {len(cand)} in the cone, "
            f"excluded: {excluded['variable']} variable, {excluded['no_eta']} without eta, "
            f"{excluded['few_epochs']} with too few epochs, {excluded['faint']} faint"
        )

    kept["weight_raw"] = 1.0 / kept["median_frac_err"] ** 2
    kept["rank"] = np.arange(1, len(kept) + 1)
    kept["weight"] = kept["weight_raw"] / kept["weight_raw"].sum()

    # Each neighbour measurement, normalized by its neighbour's median, with its fixed weight.
    meas = rows.merge(kept[["source_id", "median_flux_jy", "weight_raw"]], on="source_id")
    m = meas["median_flux_jy"].to_numpy(float)
    w = meas["weight_raw"].to_numpy(float)
    s = meas["flux_err_jy"].to_numpy(float) / m
    codes, images = pd.factorize(meas["image_id"], sort=False)
    n_img = len(images)
    w_sum = np.bincount(codes, weights=w, minlength=n_img)
    ensemble = np.bincount(codes, weights=w * meas["flux_jy"].to_numpy(float) / m, minlength=n_img)
    ensemble /= w_sum
    ensemble_err = np.sqrt(np.bincount(codes, weights=(w * s) ** 2, minlength=n_img)) / w_sum
    count = np.bincount(codes, minlength=n_img)
    per_image = pd.DataFrame(
        {"image_id": images, "ensemble": ensemble, "ensemble_err": ensemble_err, "n": count}
    )
    per_image = per_image[per_image["n"] >= min_neighbors]

    epochs = tgt.merge(per_image, on="image_id", how="inner")
    n_dropped = n_target - len(epochs)
    if epochs.empty:
        raise ValueError(
            f"source {source_id!r}: none of its {n_target} images has {min_neighbors} of its "
            f"{len(kept)} stable neighbours measured"
        )
    flux = epochs["flux_jy"].to_numpy(float)
    e_ens = epochs["ensemble"].to_numpy(float)
    epochs["relative_flux_jy"] = flux / e_ens
    epochs["relative_flux_err_jy"] = np.hypot(
        epochs["flux_err_jy"].to_numpy(float) / e_ens,
        flux * epochs["ensemble_err"].to_numpy(float) / e_ens**2,
    )
    epochs["n_neighbors"] = epochs["n"].astype(int)
    epochs = epochs.sort_values(["mjd", "image_id"], kind="mergesort").reset_index(drop=True)
    neighbors_out = kept.reset_index(drop=True)
    neighbors_out["n_epochs"] = neighbors_out["n_epochs"].astype(int)
    return RelativeLightcurve(
        source_id=source_id,
        epochs=epochs[list(EPOCH_COLUMNS)],
        neighbors=neighbors_out[list(NEIGHBOR_RESULT_COLUMNS)],
        n_images_dropped=int(n_dropped),
        excluded=excluded,
    )


def angular_separation_deg(
    ra1_deg: float, dec1_deg: float, ra2_deg: np.ndarray, dec2_deg: np.ndarray
) -> np.ndarray:
    """Great-circle separation (deg) of (ra2, dec2) from (ra1, dec1), by the haversine formula
    ``2 asin sqrt(sin^2(dDec/2) + cos dec1 cos dec2 sin^2(dRA/2))`` (accurate at small angles)."""
    ra1, dec1 = np.radians(ra1_deg), np.radians(dec1_deg)
    ra2, dec2 = np.radians(np.asarray(ra2_deg, float)), np.radians(np.asarray(dec2_deg, float))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def cone_box(
    ra_deg: float, dec_deg: float, radius_deg: float
) -> tuple[float, float, list[tuple[float, float]]]:
    """A box that contains the cone of ``radius_deg`` about (ra, dec): ``(dec_min, dec_max,
    ra_ranges)`` with RA ranges in [0, 360) (two when the box crosses RA 0; the whole circle when
    the cone reaches a pole). The RA half-width is ``asin(sin r / cos dec)``, the cone's exact
    extent in RA (its tangent points), so the box is as tight as the cone allows."""
    r = float(radius_deg)
    dec_min, dec_max = max(-90.0, dec_deg - r), min(90.0, dec_deg + r)
    if abs(dec_deg) + r >= 90.0 or r >= 90.0:
        return dec_min, dec_max, [(0.0, 360.0)]
    half = math.degrees(
        math.asin(min(1.0, math.sin(math.radians(r)) / math.cos(math.radians(dec_deg))))
    )
    lo, hi = (ra_deg - half) % 360.0, (ra_deg + half) % 360.0
    if lo <= hi:
        return dec_min, dec_max, [(lo, hi)]
    return dec_min, dec_max, [(lo, 360.0), (0.0, hi)]

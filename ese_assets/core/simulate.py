"""Survey simulator: FITS images of a monitored field with known true fluxes.

The images are built with :mod:`ese_assets.core.sim_image` (SIN WCS, beam-shaped sources,
beam-correlated noise, 2-D or 4-D FITS); those building blocks are re-exported here.

Survey (:class:`SurveyConfig`, :func:`simulate_survey`): a field observed several times a night for
a number of nights, with stable sources, ordinary variables and injected Extreme Scattering Events
(:mod:`ese_assets.core.lens`), per-image flux-scale errors and pointing jitter. Truth tables let the
tests check the photometry (unbiasedness, errors) and the detection (recovered ESEs).

Pixel conventions: numpy arrays are indexed ``[y, x]``; pixel coordinates are 0-based (astropy
``origin=0``); pixel covariances are ``[[Cxx, Cxy], [Cxy, Cyy]]`` in pixel^2.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.time import Time

from ese_assets.core import lens
from ese_assets.core.fits_image import Beam
from ese_assets.core.sim_image import (  # re-exported: tests build images with them
    STAMP_SIGMA,
    beam_covariance_pix,
    celestial_header,
    correlated_noise,
    make_sin_wcs,
    pixel_jacobian,
    render_point_sources,
    write_fits_image,
)
from ese_assets.core.source_ids import iau_source_ids

__all__ = [
    "STAMP_SIGMA",
    "SurveyConfig",
    "SurveyManifest",
    "beam_covariance_pix",
    "celestial_header",
    "correlated_noise",
    "make_sin_wcs",
    "pixel_jacobian",
    "render_point_sources",
    "simulate_survey",
    "write_fits_image",
]


# --------------------------------------------------------------------------------------------
# Survey simulation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurveyConfig:
    """Parameters of a simulated survey; the defaults are a one-month demo (120 images of 512^2).

    Time: ``n_nights`` nights from ``start_date`` (UTC), ``images_per_night`` images per night at
    ``first_hour_utc`` + k * ``cadence_hours``. Field: SIN images of ``npix`` x ``npix`` pixels of
    ``cell_arcsec`` centred on (ra_deg, dec_deg) plus a Gaussian pointing jitter of
    ``pointing_jitter_arcmin`` per axis per image. Noise: correlated (beam-shaped), ``rms_mjy``.
    Sky: ``n_sources`` point sources uniform over the central ``field_fill`` of the nominal image,
    fluxes from N(>S) ~ S^-flux_slope on [flux_min_mjy, flux_max_mjy] (Euclidean: 1.5); the catalog
    flux is the true mean flux times lognormal scatter ``catalog_scatter_frac``. Each image has a
    flux-scale gain ~ N(1, ``flux_scale_error``) applied to every source in it.
    Variables: ``n_variables`` sources (mean flux >= ``variable_min_flux_mjy`` when possible),
    alternately sinusoidal (period = timescale) and stochastic (lognormal Ornstein-Uhlenbeck with
    that correlation time), fractional modulation drawn from ``variable_modulation``.
    ESEs: ``n_ese`` hosts among sources with mean flux >= ``ese_min_flux_mjy`` (fluxes of random
    sources are redrawn above that limit if too few qualify), moved inside the central
    ``ese_inner_frac`` of the field and at least ``ese_isolation_beams`` beam majors from any other
    source; depths ``ese_depths`` (cycled if n_ese is larger), durations uniform in
    ``ese_duration_days``, t0 uniform within ``ese_t0_window`` (fractions of the time span);
    light curve :func:`ese_assets.core.lens.ese_lightcurve` with ``ese_source_size``.
    ``cube_fraction`` of the images (random) are written as 4-D CASA-style cubes.
    Same config (including ``seed``) -> byte-identical files.
    """

    seed: int = 20250101
    n_nights: int = 30
    images_per_night: int = 4
    start_date: str = "2025-01-01"
    first_hour_utc: float = 2.0
    cadence_hours: float = 1.0
    ra_deg: float = 150.0
    dec_deg: float = 30.0
    npix: int = 512
    cell_arcsec: float = 10.0
    beam_major_arcsec: float = 45.0
    beam_minor_arcsec: float = 30.0
    beam_pa_deg: float = 30.0
    freq_hz: float = 1.4e9
    pointing_jitter_arcmin: float = 2.0
    rms_mjy: float = 0.5
    n_sources: int = 250
    flux_min_mjy: float = 3.0
    flux_max_mjy: float = 2000.0
    flux_slope: float = 1.5
    field_fill: float = 0.95
    catalog_scatter_frac: float = 0.05
    flux_scale_error: float = 0.02
    cube_fraction: float = 0.25
    n_variables: int = 8
    variable_min_flux_mjy: float = 10.0
    variable_modulation: tuple[float, float] = (0.10, 0.30)
    variable_timescale_days: tuple[float, float] = (2.0, 10.0)
    n_ese: int = 6
    ese_depths: tuple[float, ...] = (0.5, 0.4, 0.35, 0.3, 0.2, 0.15)
    ese_duration_days: tuple[float, float] = (10.0, 20.0)
    ese_t0_window: tuple[float, float] = (0.3, 0.7)
    ese_min_flux_mjy: float = 20.0
    ese_source_size: float = 0.05
    ese_inner_frac: float = 0.6
    ese_isolation_beams: float = 3.0
    file_prefix: str = "img_"

    def without_variability(self) -> SurveyConfig:
        """Same sky and noise but no variables, no ESEs and no flux-scale error (every source's flux
        in every image equals its mean flux): for unbiasedness tests of the photometry."""
        return dataclasses.replace(self, n_variables=0, n_ese=0, flux_scale_error=0.0)

    @property
    def n_images(self) -> int:
        return self.n_nights * self.images_per_night

    @property
    def cell_deg(self) -> float:
        return self.cell_arcsec / 3600.0

    @property
    def beam(self) -> Beam:
        return Beam(
            self.beam_major_arcsec / 3600.0, self.beam_minor_arcsec / 3600.0, self.beam_pa_deg
        )

    def validate(self) -> None:
        """Raise ValueError on inconsistent parameters."""
        problems = []
        if self.n_nights < 1 or self.images_per_night < 1:
            problems.append("n_nights and images_per_night must be >= 1")
        if self.images_per_night * self.cadence_hours > 24:
            problems.append("images_per_night * cadence_hours exceeds a day")
        if self.npix < 16:
            problems.append("npix must be >= 16")
        if not 0 < self.flux_min_mjy < self.flux_max_mjy:
            problems.append("need 0 < flux_min_mjy < flux_max_mjy")
        if self.n_sources < self.n_ese + self.n_variables:
            problems.append("n_sources must be >= n_ese + n_variables")
        if self.n_ese and (
            len(self.ese_depths) == 0 or not all(0 < d < 1 for d in self.ese_depths)
        ):
            problems.append("ese_depths must be non-empty, each in (0, 1)")
        if not 0 <= self.cube_fraction <= 1:
            problems.append("cube_fraction must be in [0, 1]")
        if self.rms_mjy < 0 or self.flux_scale_error < 0 or self.catalog_scatter_frac < 0:
            problems.append("rms_mjy, flux_scale_error and catalog_scatter_frac must be >= 0")
        if self.n_ese and self.ese_min_flux_mjy > self.flux_max_mjy:
            problems.append("ese_min_flux_mjy exceeds flux_max_mjy")
        if problems:
            raise ValueError("invalid SurveyConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class SurveyManifest:
    """What :func:`simulate_survey` wrote. ``elapsed_s`` is the wall-clock time of the run."""

    config: SurveyConfig
    out_dir: Path
    incoming_dir: Path
    catalog_path: Path
    truth_sources_path: Path
    truth_fluxes_path: Path
    truth_images_path: Path
    image_paths: tuple[Path, ...]
    n_sources: int
    n_variables: int
    n_ese: int
    elapsed_s: float

    @property
    def n_images(self) -> int:
        return len(self.image_paths)


def _power_law_fluxes(rng, n, s_min, s_max, slope):
    """Inverse-CDF draws from N(>S) ~ S^-slope truncated to [s_min, s_max]."""
    u = rng.random(n)
    frac = (s_min / s_max) ** slope
    return s_min * (1.0 - u * (1.0 - frac)) ** (-1.0 / slope)


def _epochs(config: SurveyConfig):
    """Observation start times: (ISO strings, MJD array, file names), chronological."""
    start = np.datetime64(config.start_date, "ms")
    night = np.repeat(np.arange(config.n_nights), config.images_per_night)
    k = np.tile(np.arange(config.images_per_night), config.n_nights)
    offset_ms = np.rint((config.first_hour_utc + k * config.cadence_hours) * 3.6e6).astype(np.int64)
    stamps = start + night.astype("timedelta64[D]") + offset_ms.astype("timedelta64[ms]")
    iso = np.datetime_as_string(stamps, unit="ms").tolist()
    # MJD exactly as write_fits_image computes MJD-OBS from DATE-OBS (same astropy conversion).
    mjd = Time(iso, format="isot", scale="utc").mjd
    names = [
        f"{config.file_prefix}{s[:4]}{s[5:7]}{s[8:10]}T{s[11:13]}{s[14:16]}{s[17:19]}.fits"
        for s in iso
    ]
    return iso, np.asarray(mjd, dtype=float), names


def _sky_model(
    config: SurveyConfig, rng: np.random.Generator, mjd: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    """Source table (truth) and intrinsic flux matrix (n_images, n_sources) in mJy."""
    n = config.n_sources
    nominal = make_sin_wcs(
        config.ra_deg, config.dec_deg, config.cell_deg, (config.npix, config.npix)
    )
    centre = config.npix // 2
    half = 0.5 * config.field_fill * (config.npix - 1)
    flux = _power_law_fluxes(rng, n, config.flux_min_mjy, config.flux_max_mjy, config.flux_slope)
    x = centre + rng.uniform(-half, half, n)
    y = centre + rng.uniform(-half, half, n)

    kind = np.full(n, "stable", dtype=object)
    hosts = np.zeros(0, dtype=np.int64)
    if config.n_ese:
        eligible = np.nonzero(flux >= config.ese_min_flux_mjy)[0]
        if eligible.size < config.n_ese:
            # Too few bright sources: promote random faint ones with fluxes drawn above the limit.
            faint = np.nonzero(flux < config.ese_min_flux_mjy)[0]
            promote = rng.choice(faint, config.n_ese - eligible.size, replace=False)
            flux[promote] = _power_law_fluxes(
                rng, promote.size, config.ese_min_flux_mjy, config.flux_max_mjy, config.flux_slope
            )
            eligible = np.nonzero(flux >= config.ese_min_flux_mjy)[0]
        hosts = np.sort(rng.choice(eligible, config.n_ese, replace=False))
        kind[hosts] = "ese"
        # Hosts well inside the field and isolated (clean light curves for injection tests).
        inner = config.ese_inner_frac * 0.5 * (config.npix - 1)
        min_sep_pix = config.ese_isolation_beams * config.beam_major_arcsec / config.cell_arcsec
        todo = hosts.copy()
        for _ in range(1000):
            x[todo] = centre + rng.uniform(-inner, inner, todo.size)
            y[todo] = centre + rng.uniform(-inner, inner, todo.size)
            d2 = (x[hosts, None] - x[None, :]) ** 2 + (y[hosts, None] - y[None, :]) ** 2
            d2[np.arange(hosts.size), hosts] = np.inf
            todo = hosts[d2.min(axis=1) < min_sep_pix**2]
            if todo.size == 0:
                break
        else:
            raise ValueError(
                "could not place isolated ESE hosts; lower n_sources or ese_isolation_beams"
            )

    ra, dec = nominal.wcs_pix2world(x, y, 0)
    ra = np.mod(ra, 360.0)
    names = iau_source_ids(ra, dec)
    for _ in range(
        1000
    ):  # positions rounding to the same 1-arcsec name: redraw (names must be unique)
        dup = pd.Series(names).duplicated(keep="first").to_numpy() & (kind == "stable")
        if not dup.any():
            break
        x[dup] = centre + rng.uniform(-half, half, dup.sum())
        y[dup] = centre + rng.uniform(-half, half, dup.sum())
        ra[dup], dec[dup] = nominal.wcs_pix2world(x[dup], y[dup], 0)
        ra[dup] = np.mod(ra[dup], 360.0)
        names[dup] = iau_source_ids(ra[dup], dec[dup])
    if pd.Series(names).duplicated().any():
        raise ValueError("could not give unique names to all sources")

    factor = np.ones((mjd.size, n))
    # Ordinary variables: the brightest qualifying non-hosts are preferred in random order.
    variables = np.zeros(0, dtype=np.int64)
    var_model = np.full(n, "", dtype=object)
    var_mod = np.full(n, np.nan)
    var_tau = np.full(n, np.nan)
    if config.n_variables:
        free = np.setdiff1d(np.arange(n), hosts)
        good = free[flux[free] >= config.variable_min_flux_mjy]
        if good.size >= config.n_variables:
            variables = np.sort(rng.choice(good, config.n_variables, replace=False))
        else:
            variables = np.sort(free[np.argsort(-flux[free], kind="stable")[: config.n_variables]])
        kind[variables] = "variable"
        nv = variables.size
        m = rng.uniform(*config.variable_modulation, nv)
        tau = rng.uniform(*config.variable_timescale_days, nv)
        phase = rng.uniform(0, 2 * np.pi, nv)
        sine = np.arange(nv) % 2 == 0
        var_model[variables] = np.where(sine, "sinusoidal", "stochastic")
        var_mod[variables] = m
        var_tau[variables] = tau
        f_sine = 1.0 + m * np.sin(2 * np.pi * (mjd[:, None] - mjd[0]) / tau + phase)
        # Lognormal Ornstein-Uhlenbeck: x_k = x_{k-1} rho + sqrt(1 - rho^2) eps, exact for any
        # spacing.
        ou = np.empty((mjd.size, nv))
        ou[0] = rng.standard_normal(nv)
        eps = rng.standard_normal((mjd.size, nv))
        for k in range(1, mjd.size):  # loop over epochs (the recursion), vectorized over sources
            rho = np.exp(-(mjd[k] - mjd[k - 1]) / tau)
            ou[k] = ou[k - 1] * rho + np.sqrt(1 - rho**2) * eps[k]
        f_ou = np.exp(m * ou - 0.5 * m**2)
        factor[:, variables] = np.where(sine, f_sine, f_ou)

    ese_t0 = np.full(n, np.nan)
    ese_dur = np.full(n, np.nan)
    ese_depth = np.full(n, np.nan)
    ese_alpha = np.full(n, np.nan)
    ese_in = np.full(n, -1, dtype=np.int64)
    if hosts.size:
        span = mjd[-1] - mjd[0]
        depth = np.resize(np.asarray(config.ese_depths, dtype=float), hosts.size)
        dur = rng.uniform(*config.ese_duration_days, hosts.size)
        t0 = mjd[0] + span * rng.uniform(*config.ese_t0_window, hosts.size)
        factor[:, hosts] = lens.ese_lightcurve(mjd[:, None], t0, dur, depth, config.ese_source_size)
        ese_t0[hosts], ese_dur[hosts], ese_depth[hosts] = t0, dur, depth
        ese_alpha[hosts] = lens.alpha_for_depth(depth)
        ese_in[hosts] = (np.abs(mjd[:, None] - t0) < dur / 2).sum(axis=0)

    catalog_flux = flux * np.exp(config.catalog_scatter_frac * rng.standard_normal(n))
    truth = pd.DataFrame(
        {
            "name": pd.array(names, dtype="str"),
            "ra_deg": ra,
            "dec_deg": dec,
            "mean_flux_mjy": flux,
            "catalog_flux_mjy": catalog_flux,
            "kind": pd.array(kind, dtype="str"),
            "ese_t0_mjd": ese_t0,
            "ese_duration_days": ese_dur,
            "ese_depth": ese_depth,
            "ese_alpha": ese_alpha,
            "ese_epochs_in_event": pd.array(np.where(ese_in >= 0, ese_in, None), dtype="Int64"),
            "var_model": pd.array(var_model, dtype="str"),
            "var_modulation": var_mod,
            "var_timescale_days": var_tau,
        }
    )
    return truth, flux[None, :] * factor


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """Deterministic CSV (fixed float format and line endings), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False, float_format="%.15g", lineterminator="\n")
    os.replace(tmp, path)


ProgressCallback = Callable[[int, int, Path], None]


def simulate_survey(
    config: SurveyConfig | None = None,
    out_dir: str | os.PathLike = "ese_sim",
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> SurveyManifest:
    """Simulate ``config`` into ``out_dir`` and return the manifest.

    Writes (all CSV with a header row, floats as %.15g):
    - ``catalog.csv``: name, ra_deg, dec_deg, flux_mjy (catalog flux = mean x lognormal scatter);
    - ``truth_sources.csv``: name, ra_deg, dec_deg, mean_flux_mjy, catalog_flux_mjy,
      kind (stable/variable/ese), ese_t0_mjd, ese_duration_days, ese_depth, ese_alpha,
      ese_epochs_in_event (epochs with |t - t0| < duration/2), var_model, var_modulation,
      var_timescale_days (empty when not applicable);
    - ``truth_images.csv``: image, date_obs, mjd, ra_deg, dec_deg (pointing), gain, cube;
    - ``truth_fluxes.csv``: image, mjd, name, true_flux_mjy (intrinsic flux x image gain), gain,
      x_pix, y_pix (0-based, in that image), in_image (pixel position inside the array);
    - ``incoming/<file_prefix>YYYYMMDDTHHMMSS.fits``, one per epoch, in time order (atomic writes).
    Truth and catalog are written before the images. Random streams: one for the sky model and one
    independent child per image (numpy SeedSequence.spawn), so every image is reproducible.
    Existing outputs raise FileExistsError unless ``overwrite``; then the images listed in the old
    truth_images.csv are removed first (nothing else is deleted). ``progress(i, n, path)`` is called
    after each image.
    """
    config = config or SurveyConfig()
    config.validate()
    t_start = time.perf_counter()
    out = Path(out_dir)
    incoming = out / "incoming"
    paths = {
        k: out / f"{k}.csv" for k in ("catalog", "truth_sources", "truth_fluxes", "truth_images")
    }
    iso, mjd, names = _epochs(config)
    image_paths = [incoming / nm for nm in names]
    existing = [p for p in [*paths.values(), *image_paths] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (use overwrite=True / --overwrite)")
    if overwrite and paths["truth_images"].exists():
        old = pd.read_csv(paths["truth_images"], usecols=["image"])["image"]
        for name in old:
            (incoming / Path(str(name)).name).unlink(missing_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)

    root = np.random.SeedSequence(config.seed)
    sky_seq, image_seq = root.spawn(2)
    rng = np.random.default_rng(sky_seq)
    truth, intrinsic_mjy = _sky_model(config, rng, mjd)
    n_img = mjd.size
    gain = 1.0 + config.flux_scale_error * rng.standard_normal(n_img)
    jitter_deg = config.pointing_jitter_arcmin / 60.0 * rng.standard_normal((n_img, 2))
    point_dec = config.dec_deg + jitter_deg[:, 1]
    point_ra = np.mod(config.ra_deg + jitter_deg[:, 0] / np.cos(np.radians(point_dec)), 360.0)
    cube = rng.random(n_img) < config.cube_fraction
    true_mjy = intrinsic_mjy * gain[:, None]

    catalog = pd.DataFrame(
        {
            "name": truth["name"],
            "ra_deg": truth["ra_deg"],
            "dec_deg": truth["dec_deg"],
            "flux_mjy": truth["catalog_flux_mjy"],
        }
    )
    images = pd.DataFrame(
        {
            "image": pd.array(names, dtype="str"),
            "date_obs": pd.array(iso, dtype="str"),
            "mjd": mjd,
            "ra_deg": point_ra,
            "dec_deg": point_dec,
            "gain": gain,
            "cube": cube,
        }
    )
    shape = (config.npix, config.npix)
    beam = config.beam
    ra_src = truth["ra_deg"].to_numpy()
    dec_src = truth["dec_deg"].to_numpy()
    xs = np.empty((n_img, config.n_sources))
    ys = np.empty((n_img, config.n_sources))
    wcss = []
    for i in range(n_img):
        wcs = make_sin_wcs(point_ra[i], point_dec[i], config.cell_deg, shape)
        xs[i], ys[i] = wcs.wcs_world2pix(ra_src, dec_src, 0)
        wcss.append(wcs)
    in_image = (xs >= -0.5) & (xs < config.npix - 0.5) & (ys >= -0.5) & (ys < config.npix - 0.5)
    fluxes = pd.DataFrame(
        {
            "image": pd.array(np.repeat(names, config.n_sources), dtype="str"),
            "mjd": np.repeat(mjd, config.n_sources),
            "name": pd.array(np.tile(truth["name"].to_numpy(dtype=object), n_img), dtype="str"),
            "true_flux_mjy": true_mjy.ravel(),
            "gain": np.repeat(gain, config.n_sources),
            "x_pix": xs.ravel(),
            "y_pix": ys.ravel(),
            "in_image": in_image.ravel(),
        }
    )
    _write_csv(truth, paths["truth_sources"])
    _write_csv(images, paths["truth_images"])
    _write_csv(fluxes, paths["truth_fluxes"])
    _write_csv(catalog, paths["catalog"])

    image_rngs = [np.random.default_rng(s) for s in image_seq.spawn(n_img)]
    rms_jyb = config.rms_mjy / 1000.0
    for i in range(n_img):
        wcs = wcss[i]
        data = render_point_sources(shape, wcs, beam, ra_src, dec_src, true_mjy[i] / 1000.0)
        if rms_jyb > 0:
            data += correlated_noise(shape, beam_covariance_pix(wcs, beam), rms_jyb, image_rngs[i])
        write_fits_image(
            image_paths[i],
            data,
            ra_deg=point_ra[i],
            dec_deg=point_dec[i],
            cell_deg=config.cell_deg,
            beam=beam,
            date_obs=iso[i],
            freq_hz=config.freq_hz,
            cube=bool(cube[i]),
            extra_header={"OBJECT": "ESE_SIM_FIELD", "EXPTIME": 300.0},
        )
        if progress is not None:
            progress(i + 1, n_img, image_paths[i])

    kinds = truth["kind"].to_numpy(dtype=object)
    return SurveyManifest(
        config=config,
        out_dir=out,
        incoming_dir=incoming,
        catalog_path=paths["catalog"],
        truth_sources_path=paths["truth_sources"],
        truth_fluxes_path=paths["truth_fluxes"],
        truth_images_path=paths["truth_images"],
        image_paths=tuple(image_paths),
        n_sources=config.n_sources,
        n_variables=int((kinds == "variable").sum()),
        n_ese=int((kinds == "ese").sum()),
        elapsed_s=time.perf_counter() - t_start,
    )

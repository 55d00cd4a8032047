"""Error bars from the data: the per-image noise-correlation factor (core.noise_correlation).

Images are real FITS files written in the conventions of real writers (a CASA cube with a BEAMS
table, an AIPS image with the beam in HISTORY, a Galactic image with the beam in arcsec), whose
noise is white noise convolved with a Gaussian so that its autocorrelation is as wide as the beam,
sqrt(2) wider, or half as wide, normalised to a known pixel RMS, plus injected point sources.
Catalog positions without a source ("blank positions") are measured like sources. Expected
factors are computed independently of the code under test: from the noise generator's power
spectrum (the exact discrete autocorrelation), a double sum over stamp pixels (eq. 1 of the
module) and the closed form of the well-sampled limit. Statistical tolerances are ~3.5 standard
errors at fixed seeds.
"""

from __future__ import annotations

import dataclasses
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from astropy.io import fits
from astropy.wcs import WCS

from ese_assets.core.background import background_and_rms
from ese_assets.core.beam import FWHM_PER_SIGMA, Beam
from ese_assets.core.catalog import Catalog, load_catalog_cached
from ese_assets.core.fits_image import load_image
from ese_assets.core.kernels import correlated_noise_factor
from ese_assets.core.noise_correlation import (
    MIN_POSITIONS,
    NOISE_CORRELATION_MODES,
    measure_noise_correlation,
    validate_noise_correlation,
)
from ese_assets.core.photometry import beam_covariance_pixels, forced_photometry
from ese_assets.core.sim_image import correlated_noise, make_sin_wcs
from ese_assets.definitions import build_definitions
from ese_assets.pipeline import measurement, registration
from ese_assets.settings import Settings
from ese_assets.storage import engine as engine_mod
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets_tests.header_conventions import ImageSpec, _beam_cov_pix, write_field
from ese_assets_tests.survey import NIGHTS, make_workspace

#: The ``images`` columns of the error model (storage.schema).
NOISE_COLUMNS = ("noise_corr_factor", "noise_corr_err", "noise_corr_positions", "noise_corr_reason")

SHAPE = (1024, 1024)
SOURCE_SPACING_PIX = 400.0  # 4-9 injected sources inside each image
BLANK_SPACING_PIX = 48  # blank positions: their stamps leave ~10 % of the image source-free
BLANK_CLEARANCE_PIX = 24  # blank positions at least this far (per axis) from any source

# (name, autocorrelation width in beams, writer convention)
CASES = [
    ("like the beam", 1.0, dict(cube=True, beam_style="casa")),
    ("sqrt(2) wider", math.sqrt(2.0), dict(frame="fk5-aips", beam_style="aips")),
    ("half as wide", 0.5, dict(frame="galactic", beam_style="arcsec")),
]


# --------------------------------------------------------------------------------------------
# Independent expectations
# --------------------------------------------------------------------------------------------
def _stamp_half(cov_pix: np.ndarray) -> int:
    """The photometry's stamp half-width: 3 beam majors across (science brief section 1)."""
    major_pix = FWHM_PER_SIGMA * math.sqrt(float(np.linalg.eigvalsh(cov_pix)[-1]))
    return math.ceil(1.5 * major_pix)


def _expected_factor(cov_pix: np.ndarray, acf_scale: float) -> float:
    """c of eq. (3) for the noise of ImageSpec(noise_acf_scale=acf_scale), independently.

    Numerator: sum_ij K_i K_j rho(i - j) with rho the generator's exact discrete autocorrelation
    (inverse DFT of |H|^2, H = exp(-2 pi^2 k^T (s^2 C / 2) k) the transfer function of the noise
    made by convolution, on a 512^2 frequency grid). Denominator: the same double sum with the
    beam-shaped rho = exp(-tau^T C^-1 tau / 2) of the photometry's model. Pixel-pair sums, no FFT
    convolution, no code under test."""
    h = _stamp_half(cov_pix)
    off = np.arange(-h, h + 1)
    dx, dy = (a.ravel() for a in np.meshgrid(off, off))
    icov = np.linalg.inv(cov_pix)

    def quad(ddx, ddy):
        return icov[0, 0] * ddx**2 + 2 * icov[0, 1] * ddx * ddy + icov[1, 1] * ddy**2

    k = np.exp(-0.5 * quad(dx, dy))
    kk = np.outer(k, k)
    lx = dx[:, None] - dx[None, :]
    ly = dy[:, None] - dy[None, :]
    rho_beam = np.exp(-0.5 * quad(lx, ly))
    m = 512
    fx = np.fft.fftfreq(m)[None, :]
    fy = np.fft.fftfreq(m)[:, None]
    g = 0.5 * acf_scale**2 * cov_pix
    power = np.exp(-4.0 * np.pi**2 * (g[0, 0] * fx**2 + 2 * g[0, 1] * fx * fy + g[1, 1] * fy**2))
    acf = np.fft.ifft2(power).real
    rho_noise = acf[ly % m, lx % m] / acf[0, 0]
    return math.sqrt(float(np.sum(kk * rho_noise)) / float(np.sum(kk * rho_beam)))


def _closed_form_factor(acf_scale: float) -> float:
    """Eq. (2): sqrt(3 s^2 / (s^2 + 2)), the well-sampled, infinite-stamp limit."""
    s2 = acf_scale**2
    return math.sqrt(3.0 * s2 / (s2 + 2.0))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measured:
    blank_pulls: np.ndarray  # flux / error at blank positions, measured errors
    blank_pulls_beam: np.ndarray  # the same with the beam assumption
    source_pulls: np.ndarray  # (flux - injected) / error at the injected sources
    factors: list  # NoiseCorrelation per image
    cov_pix: np.ndarray  # beam covariance in pixels at the image centre


def _with_blank_positions(path: str, field) -> tuple[Catalog, np.ndarray]:
    """The field's catalog plus blank positions on a grid away from every source and edge;
    returns it and a mask of the blank entries. Pixel -> sky with astropy's high-level API on
    the file's own celestial WCS (whatever its frame), then to ICRS."""
    wcs = WCS(fits.getheader(path)).celestial
    ny, nx = SHAPE
    edge = 20
    g = np.arange(edge, nx - edge, BLANK_SPACING_PIX, dtype=float) + 0.37  # sub-pixel
    gx, gy = (a.ravel() for a in np.meshgrid(g, np.arange(edge, ny - edge, BLANK_SPACING_PIX)))
    cheb = np.maximum(
        np.abs(gx[:, None] - field.x_lon_pix[None, :]),
        np.abs(gy[:, None] - field.y_lat_pix[None, :]),
    ).min(axis=1)
    gx, gy = gx[cheb >= BLANK_CLEARANCE_PIX], gy[cheb >= BLANK_CLEARANCE_PIX]
    sky = wcs.pixel_to_world(gx, gy).icrs
    cat = field.catalog
    n_blank = gx.size
    catalog = Catalog(
        source_id=np.concatenate([cat.source_id, [f"B{i:05d}" for i in range(n_blank)]]),
        ra_deg=np.concatenate([cat.ra_deg, sky.ra.deg]),
        dec_deg=np.concatenate([cat.dec_deg, sky.dec.deg]),
        flux_mjy=np.concatenate([cat.flux_mjy, np.zeros(n_blank)]),
        path="injected+blank",
    )
    blank = np.concatenate([np.zeros(len(cat), dtype=bool), np.ones(n_blank, dtype=bool)])
    return catalog, blank


def _measure_case(tmp_path, acf_scale: float, writer: dict, seeds=(1, 2, 3)) -> Measured:
    blank_pulls, blank_beam, source_pulls, factors = [], [], [], []
    cov_pix = None
    for seed in seeds:
        spec = ImageSpec(shape=SHAPE, noise_acf_scale=acf_scale, **writer)
        path = str(tmp_path / f"img_{acf_scale:.3f}_{seed}.fits")
        field = write_field(path, spec, seed=seed, spacing_pix=SOURCE_SPACING_PIX, margin_pix=40.0)
        catalog, blank = _with_blank_positions(path, field)
        image = load_image(path)
        info = image.info
        idx, lon, lat = catalog.footprint_positions(info.wcs, info.shape)
        measured = forced_photometry(
            image.data, info.wcs, info.beam, lon, lat, noise_correlation="measure"
        )
        beam = forced_photometry(
            image.data, info.wcs, info.beam, lon, lat, noise_correlation="beam"
        )
        assert np.all(measured.quality_flag == 0)
        np.testing.assert_array_equal(measured.peak_jyb, beam.peak_jyb)  # only errors change
        is_blank = blank[idx]
        pulls = measured.peak_jyb / measured.peak_err_jyb
        blank_pulls.append(pulls[is_blank])
        blank_beam.append((beam.peak_jyb / beam.peak_err_jyb)[is_blank])
        truth = catalog.flux_mjy[idx][~is_blank] / 1e3
        source_pulls.append(
            (measured.peak_jyb[~is_blank] - truth) / measured.peak_err_jyb[~is_blank]
        )
        factors.append(measured.noise)
        if cov_pix is None:
            wcs2d = WCS(fits.getheader(path)).celestial
            centre = wcs2d.pixel_to_world([(SHAPE[1] - 1) / 2], [(SHAPE[0] - 1) / 2])
            cov_pix = _beam_cov_pix(wcs2d, centre, spec.beam)[0]
    return Measured(
        np.concatenate(blank_pulls),
        np.concatenate(blank_beam),
        np.concatenate(source_pulls),
        factors,
        cov_pix,
    )


@pytest.mark.parametrize("name,acf_scale,writer", CASES, ids=[c[0] for c in CASES])
def test_blank_positions_have_unit_pulls_whatever_the_noise_correlation(
    tmp_path, name, acf_scale, writer
):
    m = _measure_case(tmp_path, acf_scale, writer)
    n = m.blank_pulls.size
    assert n >= 1000, n
    std = float(np.std(m.blank_pulls, ddof=1))
    # The target: blank-position flux/error std within 0.9-1.1.
    assert 0.9 <= std <= 1.1, (name, std)
    assert abs(float(np.mean(m.blank_pulls))) < 3.5 / math.sqrt(n) + 0.02
    # The beam assumption misses the target except for beam-like noise (the test discriminates).
    std_beam = float(np.std(m.blank_pulls_beam, ddof=1))
    expected_beam_std = _expected_factor(m.cov_pix, acf_scale)
    assert std_beam == pytest.approx(expected_beam_std, rel=0.08), (name, std_beam)
    if acf_scale != 1.0:
        assert not 0.9 <= std_beam <= 1.1, (name, std_beam)

    # Injected sources (20-200 sigma) are recovered within their (measured) errors.
    assert m.source_pulls.size >= 15
    assert np.all(np.abs(m.source_pulls) < 4.0), m.source_pulls
    assert 0.3 < float(np.mean(m.source_pulls**2)) < 2.0

    # The measured factor agrees with the independent computation, within its stated error.
    expected = _expected_factor(m.cov_pix, acf_scale)
    for nc in m.factors:
        assert nc.measured and nc.reason is None
        assert nc.n_positions >= 1000
        assert 0.0 < nc.factor_err < 0.06 * nc.factor
        assert abs(nc.factor - expected) < 3.5 * nc.factor_err + 0.01, (nc, expected)
    # ... and the pooled factor to ~1.5 %.
    mean_factor = float(np.mean([nc.factor for nc in m.factors]))
    pooled_err = math.sqrt(sum(nc.factor_err**2 for nc in m.factors)) / len(m.factors)
    assert abs(mean_factor - expected) < 3.5 * pooled_err + 0.005, (mean_factor, expected)
    if acf_scale >= 1.0:  # well sampled (autocorrelation FWHM >= 3.3 pixels): eq. (2) holds
        assert expected == pytest.approx(_closed_form_factor(acf_scale), rel=0.02)


# --------------------------------------------------------------------------------------------
# The estimator on arrays: more widths, its stated uncertainty, robustness, fallbacks
# --------------------------------------------------------------------------------------------
_COV = np.array([[4.0, 1.2], [1.2, 2.5]])  # pixel^2: an inclined elliptical beam, ~4.9 x 3.4 px


def _noise_image(shape, acf_scale, rng, rms=1e-3):
    return correlated_noise(shape, _COV * acf_scale**2, rms, rng).astype(np.float32)


def _measure_array(data, sources_x=(), sources_y=(), **kwargs):
    major_pix = FWHM_PER_SIGMA * math.sqrt(float(np.linalg.eigvalsh(_COV)[-1]))
    box = round(20 * major_pix)
    bkg, rms = background_and_rms(data, box, stride=max(1, math.floor(major_pix / 2.5)))
    return measure_noise_correlation(
        data,
        np.linalg.inv(_COV),
        _stamp_half(_COV),
        background_mesh=bkg,
        rms_mesh=rms,
        box_pix=box,
        source_x_pix=np.asarray(sources_x, dtype=float),
        source_y_pix=np.asarray(sources_y, dtype=float),
        **kwargs,
    )


@pytest.mark.parametrize("acf_scale", [0.0, 1.0 / math.sqrt(2.0), 2.0])
def test_factor_matches_the_noise_spectrum_for_more_widths(acf_scale):
    """White noise (0), 1/sqrt(2) (noise 0.77x the beam error, as on one real image) and twice
    as wide as the beam (1.41x)."""
    rng = np.random.default_rng(7)
    nc = _measure_array(_noise_image((768, 768), acf_scale, rng))
    expected = _expected_factor(_COV, acf_scale)
    assert nc.measured and nc.n_positions > 5000
    assert abs(nc.factor - expected) < 3.5 * nc.factor_err + 0.005, (nc, expected)


def test_stated_uncertainty_matches_the_scatter_over_noise_realisations():
    """Monte-Carlo: 40 realisations of a 256^2 image; the scatter of the factor agrees with the
    mean stated uncertainty within the precision of 40 samples (the block estimate may be
    somewhat conservative when neighbouring positions correlate)."""
    rng = np.random.default_rng(11)
    for acf_scale in (1.0, 2.0):
        results = [_measure_array(_noise_image((256, 256), acf_scale, rng)) for _ in range(40)]
        factors = np.array([r.factor for r in results])
        stated = float(np.mean([r.factor_err for r in results]))
        scatter = float(np.std(factors, ddof=1))
        assert 0.6 < scatter / stated < 1.4, (acf_scale, scatter, stated)
        expected = _expected_factor(_COV, acf_scale)
        assert abs(factors.mean() - expected) < 3.5 * scatter / math.sqrt(40) + 0.005


def test_uncatalogued_sources_and_blank_pixels_do_not_bias_the_factor():
    rng = np.random.default_rng(3)
    shape = (768, 768)
    noise = _noise_image(shape, math.sqrt(2.0), rng)
    clean = _measure_array(noise)
    # 150 sources missing from the catalog (5-200 sigma), and a blanked quarter of the image.
    sky = noise.astype(float)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    icov = np.linalg.inv(_COV)
    for x0, y0, f in zip(
        rng.uniform(0, shape[1], 150),
        rng.uniform(0, shape[0], 150),
        1e-3 * np.exp(rng.uniform(np.log(5), np.log(200), 150)),
        strict=True,
    ):
        cut = (slice(max(0, int(y0) - 20), int(y0) + 21), slice(max(0, int(x0) - 20), int(x0) + 21))
        dx, dy = xx[cut] - x0, yy[cut] - y0
        sky[cut] += f * np.exp(
            -0.5 * (icov[0, 0] * dx**2 + 2 * icov[0, 1] * dx * dy + icov[1, 1] * dy**2)
        )
    sky[: shape[0] // 2, : shape[1] // 2] = np.nan
    dirty = _measure_array(sky.astype(np.float32))
    assert dirty.measured
    assert dirty.n_positions < 0.8 * clean.n_positions  # the blank quarter holds no position
    tol = 3.5 * math.hypot(clean.factor_err, dirty.factor_err)
    assert abs(dirty.factor - clean.factor) < tol, (clean, dirty)


def test_too_few_source_free_positions_keep_the_beam_assumption():
    rng = np.random.default_rng(5)
    data = _noise_image((256, 256), 2.0, rng)
    # A crowded catalog: a source every 12 pixels leaves no stamp free of sources.
    g = np.arange(6.0, 256.0, 12.0)
    sx, sy = (a.ravel() for a in np.meshgrid(g, g))
    nc = _measure_array(data, sx, sy)
    assert not nc.measured and nc.factor == 1.0 and math.isnan(nc.factor_err)
    assert nc.n_positions < MIN_POSITIONS
    assert "source-free positions" in nc.reason and str(MIN_POSITIONS) in nc.reason
    # The same image without a catalog has plenty of positions.
    assert _measure_array(data).measured


def test_forced_photometry_reports_the_model_it_used():
    rng = np.random.default_rng(9)
    shape = (512, 512)
    wcs = make_sin_wcs(30.0, -20.0, 6.0 / 3600.0, shape)
    beam = Beam(30.0 / 3600.0, 20.0 / 3600.0, 35.0)
    data = rng.normal(0.0, 1e-3, shape)  # white noise: the beam model overestimates errors
    ra, dec = wcs.pixel_to_world_values([100.3, 300.7], [200.2, 410.9])
    white = forced_photometry(data, wcs, beam, ra, dec, noise_correlation="none")
    beam_model = forced_photometry(data, wcs, beam, ra, dec, noise_correlation="beam")
    measured = forced_photometry(data, wcs, beam, ra, dec, noise_correlation="measure")
    assert white.noise is None
    assert beam_model.noise.factor == 1.0 and not beam_model.noise.measured
    assert measured.noise.measured
    np.testing.assert_allclose(
        measured.peak_err_jyb, beam_model.peak_err_jyb * measured.noise.factor, rtol=1e-12
    )
    # For white noise the measured errors come out as the white-noise model's (to ~3 %).
    np.testing.assert_allclose(measured.peak_err_jyb, white.peak_err_jyb, rtol=0.05)
    with pytest.raises(ValueError, match="noise_correlation must be one of"):
        forced_photometry(data, wcs, beam, ra, dec, noise_correlation="data")


def test_mode_validation_names_the_choices():
    assert NOISE_CORRELATION_MODES == ("measure", "beam")
    assert validate_noise_correlation("beam") == "beam"
    with pytest.raises(ValueError, match="measure, beam"):
        validate_noise_correlation("Measure")


# --------------------------------------------------------------------------------------------
# The pipeline: the factor per image in `images`, the errors it scaled, the asset's metadata
# --------------------------------------------------------------------------------------------
def _image_rows(engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(
            sa.text(
                "SELECT path, status, noise_corr_factor, noise_corr_err, noise_corr_positions, "
                "noise_corr_reason FROM images ORDER BY path"
            ),
            conn,
        )


def _beam_model_errors(engine, path: str) -> pd.DataFrame:
    """Unflagged rows of one image with the beam model's error computed independently of the
    pipeline: local RMS x the stamp's correlated-noise factor (core.kernels, eq. 1)."""
    with engine.connect() as conn:
        rows = pd.read_sql(
            sa.text(
                "SELECT peak_err_jyb, local_rms_jyb FROM photometry "
                "WHERE image_path = :p AND quality_flag = 0"
            ),
            conn,
            params={"p": path},
        )
    info = load_image(path).info
    ny, nx = info.shape
    centre = info.wcs.pixel_to_world_values(0.5 * (nx - 1), 0.5 * (ny - 1))
    cov = beam_covariance_pixels(info.wcs, info.beam, float(centre[0]), float(centre[1]))[0]
    factor = correlated_noise_factor(cov, _stamp_half(cov), "beam")
    return rows.assign(beam_err=rows["local_rms_jyb"] * factor)


def _run_night(settings, night: str, instance):
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    result = job.execute_in_process(partition_key=night, instance=instance)
    assert result.success
    return result


@pytest.mark.parametrize("mode", NOISE_CORRELATION_MODES)
def test_a_pipeline_run_stores_the_factor_per_image(tmp_path, small_survey, mode):
    settings = dataclasses.replace(
        make_workspace(tmp_path, small_survey), noise_correlation=mode, photometry_workers=2
    )
    with dg.instance_for_test() as instance:
        result = _run_night(settings, NIGHTS[0], instance)
    engine = make_engine(settings.products_db)
    images = _image_rows(engine)
    images = images[images["status"] == "measured"]
    assert len(images) == 4
    meta = next(
        m.materialization.metadata
        for m in result.get_asset_materialization_events()
        if m.asset_key.to_user_string() == "photometry"
    )
    assert meta["noise_correlation"].value == mode
    assert len(meta["noise_corr_images"].value.records) == 4
    for row in images.itertuples():
        stored = _beam_model_errors(engine, row.path)
        assert len(stored) >= 20
        # The stored errors are the beam model's times the image's stored factor.
        np.testing.assert_allclose(
            stored["peak_err_jyb"], stored["beam_err"] * row.noise_corr_factor, rtol=1e-6
        )
        if mode == "measure":
            # 256^2 images of 40 sources: a few hundred source-free positions, ~6 % precision;
            # the simulator's noise is correlated like the beam, so the factor is 1.
            assert row.noise_corr_positions >= MIN_POSITIONS and pd.isna(row.noise_corr_reason)
            assert 0.0 < row.noise_corr_err < 0.1
            assert abs(row.noise_corr_factor - 1.0) < 3.5 * row.noise_corr_err
        else:
            assert row.noise_corr_factor == 1.0
            assert pd.isna(row.noise_corr_err) and pd.isna(row.noise_corr_positions)
            assert "beam" in row.noise_corr_reason
    if mode == "measure":
        factors = images["noise_corr_factor"]
        assert meta["noise_corr_factor_median"].value == pytest.approx(float(factors.median()))
        assert meta["images_beam_assumption"].value == 0
    else:
        assert meta["noise_corr_factor_median"].value is None
        assert meta["images_beam_assumption"].value == 4


def test_an_image_too_crowded_to_measure_keeps_the_beam_assumption_with_the_reason(tmp_path):
    """A 140 x 160 image with a source every 22 pixels: no stamp-sized patch free of sources."""
    field = write_field(tmp_path / "crowded.fits", ImageSpec(noise_acf_scale=math.sqrt(2.0)))
    engine = make_engine(tmp_path / "products.sqlite3")
    ensure_schema(engine)
    path = str((tmp_path / "crowded.fits").resolve())
    scan = registration.inspect_files(engine, [path], timezone="UTC", first_night="2020-01-01")
    assert scan.registered == [path]
    result = measurement.measure_image(engine, field.catalog, path)
    assert result.status == "measured" and not result.noise.measured
    row = _image_rows(engine).iloc[0]
    assert row["noise_corr_factor"] == 1.0 and pd.isna(row["noise_corr_err"])
    assert "source-free positions" in row["noise_corr_reason"]
    stored = _beam_model_errors(engine, path)
    np.testing.assert_allclose(stored["peak_err_jyb"], stored["beam_err"], rtol=1e-6)


def test_an_older_database_gets_the_columns(engine, small_survey):
    """A products database made before the noise columns existed gets them by ALTER TABLE (NULL
    in its rows), on SQLite and PostgreSQL; the next measurement fills them."""
    with engine.begin() as conn:
        for col in NOISE_COLUMNS:
            conn.execute(sa.text(f'ALTER TABLE images DROP COLUMN "{col}"'))
    path = str(sorted((small_survey / "incoming").glob("*.fits"))[0])
    registration.inspect_files(engine, [path], timezone="UTC", first_night="2020-01-01")
    engine_mod._schema_checked.discard(engine)
    engine_mod.ensure_schema(engine)
    assert _image_rows(engine)[list(NOISE_COLUMNS)].isna().all().all()
    catalog = load_catalog_cached(str(small_survey / "catalog.csv"))
    measurement.measure_image(engine, catalog, path)
    row = _image_rows(engine).iloc[0]
    assert row["noise_corr_factor"] > 0 and row["noise_corr_positions"] >= MIN_POSITIONS


def test_the_setting_is_validated_in_one_line(monkeypatch):
    monkeypatch.setenv("ESE_NOISE_CORRELATION", "beam")
    assert Settings.from_env().noise_correlation == "beam"
    monkeypatch.delenv("ESE_NOISE_CORRELATION")
    assert Settings.from_env().noise_correlation == "measure"
    monkeypatch.setenv("ESE_NOISE_CORRELATION", "data")
    with pytest.raises(ValueError) as err:
        Settings.from_env()
    assert str(err.value) == "ESE_NOISE_CORRELATION='data' must be one of measure, beam"

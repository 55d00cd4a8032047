"""Cost of measuring the noise correlation: forced photometry with and without it, same image.

For each source count (default 1 000 and 10 000 on a 2048x2048 float32 image, the images of
``bench_photometry``: beam 4.5 x 3 pixels, beam-correlated noise, 3-100 mJy sources), in the same
process and run:

* ``forced_photometry(..., noise_correlation="beam")`` (**the baseline**: the analytic error model,
  background and noise mesh included);
* ``forced_photometry(..., noise_correlation="measure")`` (what the pipeline runs by default): the
  same plus the per-image factor (:mod:`ese_assets.core.noise_correlation`);
* ``measure_noise_correlation`` alone, on the meshes of the image (the added work itself).

It also prints the factor, its stated uncertainty and the number of source-free positions, which
for this beam-correlated noise must be 1 within that uncertainty (the check that the cheap
measurement measures the right thing), and the same quantities for noise sqrt(2) wider than the
beam (factor sqrt(3/2) = 1.225 expected in the well-sampled limit).

Run: ``.venv/bin/python benchmarks/bench_noise_correlation.py [--npix 2048] [--sources 1000]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from _common import (
    add_common_arguments,
    fmt_ratio,
    fmt_seconds,
    make_field,
    print_header,
    print_table,
    time_call,
)

from ese_assets.core import simulate as sim
from ese_assets.core.background import background_and_rms
from ese_assets.core.beam import FWHM_PER_SIGMA
from ese_assets.core.kernels import inverse_2x2
from ese_assets.core.noise_correlation import measure_noise_correlation
from ese_assets.core.photometry import beam_covariance_pixels, forced_photometry

#: forced_photometry's stamp and mesh sizes in beam majors (its defaults).
STAMP_BEAMS = 3.0
MESH_BEAMS = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--npix", type=int, default=2048, help="image side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--sources",
        default="1000,10000",
        help="comma-separated source counts, one image each (default: %(default)s)",
    )
    return add_common_arguments(parser, repeat=7).parse_args(argv)


def _meshes(field, ra, dec):
    """The inputs forced_photometry gives measure_noise_correlation (computed the same way)."""
    data = field.data
    ny, nx = data.shape
    ra_c, dec_c = field.wcs.wcs_pix2world(0.5 * (nx - 1), 0.5 * (ny - 1), 0)
    cov = beam_covariance_pixels(field.wcs, field.beam, float(ra_c), float(dec_c))[0]
    major_pix = FWHM_PER_SIGMA * math.sqrt(float(np.linalg.eigvalsh(cov)[-1]))
    h = max(1, math.ceil(0.5 * STAMP_BEAMS * major_pix))
    box = max(1, round(MESH_BEAMS * major_pix))
    bkg, rms = background_and_rms(data, box, stride=max(1, math.floor(major_pix / 2.5 + 1e-6)))
    x, y = field.wcs.wcs_world2pix(ra, dec, 0)
    return dict(
        icov=inverse_2x2(cov), h=h, bkg=bkg, rms=rms, box=box, x=np.asarray(x), y=np.asarray(y)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.sources.split(",") if c.strip()]
    print_header(
        "Noise-correlation factor: forced photometry with the measured factor vs the beam model",
        [
            f"image {args.npix}x{args.npix} float32, sources {counts}, median of "
            f"{args.repeat} runs per row",
        ],
    )
    rng = np.random.default_rng(args.seed)
    rows = []
    checks = []
    for n in counts:
        field = make_field(args.npix, n, rng)
        field.data = field.data.astype(np.float32)
        ra, dec = field.catalog.ra_deg, field.catalog.dec_deg

        def photometry(mode, f=field, ra=ra, dec=dec):
            return forced_photometry(f.data, f.wcs, f.beam, ra, dec, noise_correlation=mode)

        beam = time_call(lambda: photometry("beam"), args.repeat)
        measured = time_call(lambda: photometry("measure"), args.repeat)
        m = _meshes(field, ra, dec)

        def alone(data=field.data, m=m):
            return measure_noise_correlation(
                data,
                m["icov"],
                m["h"],
                background_mesh=m["bkg"],
                rms_mesh=m["rms"],
                box_pix=m["box"],
                source_x_pix=m["x"],
                source_y_pix=m["y"],
            )

        factor_only = time_call(alone, args.repeat)
        nc = measured.value.noise
        rows += [
            (f"{n} sources: beam model (baseline)", fmt_seconds(beam.median), fmt_ratio(1.0)),
            (
                f"{n} sources: measured factor",
                fmt_seconds(measured.median),
                fmt_ratio(measured.median / beam.median),
            ),
            (
                f"{n} sources: measure_noise_correlation alone",
                fmt_seconds(factor_only.median),
                fmt_ratio(factor_only.median / beam.median),
            ),
        ]
        checks.append(("beam-like noise", n, nc, 1.0))
        # The same sky with noise sqrt(2) wider than the beam (white noise convolved with it).
        cov = sim.beam_covariance_pix(field.wcs, field.beam)
        sky = sim.render_point_sources(
            field.data.shape, field.wcs, field.beam, ra, dec, field.catalog.flux_mjy / 1e3
        )
        wide = (sky + sim.correlated_noise(field.data.shape, 2.0 * cov, 0.5e-3, rng)).astype(
            np.float32
        )
        wide_nc = forced_photometry(
            wide, field.wcs, field.beam, ra, dec, noise_correlation="measure"
        ).noise
        checks.append(("noise sqrt(2) wider", n, wide_nc, math.sqrt(1.5)))

    print_table(["row", "median time", "ratio"], rows)
    print_table(
        ["noise", "sources", "factor", "stated error", "positions", "expected", "deviation/error"],
        [
            (
                name,
                n,
                f"{nc.factor:.4f}",
                f"{nc.factor_err:.4f}",
                nc.n_positions,
                f"{expected:.4f}",
                f"{(nc.factor - expected) / nc.factor_err:+.2f}",
            )
            for name, n, nc, expected in checks
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

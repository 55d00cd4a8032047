"""Forced photometry of one image: vectorized ``forced_photometry`` vs per-source baselines.

Rows (all on the same simulated image, same process):

* vectorized, image in memory: ``forced_photometry(data, wcs, beam, ra[all], dec[all])``;
* vectorized, from the FITS file: ``load_image`` + the same call (what ``pipeline.measure_image``
  does before writing to the database);
* per-source Python loop, mesh once: the same estimator (background/RMS mesh computed once, then
  one source at a time: WCS, local beam, stamp, ``F = sum(d K w) / sum(K^2 w)``, error = image
  factor x local RMS) written with the module's public building blocks. Blended sources are fitted
  alone here (the vectorized code fits them jointly), so agreement is checked on isolated sources;
* ``forced_photometry`` called with one source per call (image in memory): each call recomputes
  the background mesh, timed on a sample and extrapolated;
* the seed system's pattern: the FITS file re-read for every source (``load_image`` +
  ``forced_photometry`` of that source), timed on a sample and extrapolated.

Run: ``.venv/bin/python benchmarks/bench_photometry.py [--npix 2048] [--sources 5000]``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys

import numpy as np
from _common import (
    Timing,
    add_common_arguments,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    make_field,
    peak_traced_mib,
    print_header,
    print_table,
    quiet_logging,
    temp_dir,
    time_call,
    write_field_fits,
)

from ese_assets.core.fits_image import load_image
from ese_assets.core.photometry import (
    FLAG_BLENDED,
    FLAG_EDGE,
    FWHM_PER_SIGMA,
    background_and_rms,
    beam_covariance_pixels,
    correlated_noise_factor,
    forced_photometry,
    sample_mesh,
)

#: forced_photometry defaults the per-source loop reproduces (stamp and mesh sizes in beam majors).
STAMP_BEAMS = 3.0
MESH_BEAMS = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--npix", type=int, default=2048, help="image side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--sources", type=int, default=5000, help="sources in the image (default: %(default)s)"
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=25,
        help="sources timed for the one-call-per-source baselines, which are then "
        "extrapolated to --sources (default: %(default)s)",
    )
    return add_common_arguments(parser, repeat=3).parse_args(argv)


# --------------------------------------------------------------------------------------------
# Per-source baseline (same estimator, Python loop over sources)
# --------------------------------------------------------------------------------------------


def _image_geometry(data: np.ndarray, wcs, beam) -> dict:
    """Stamp half-size, source-mask half-sizes, mesh box, mesh stride and noise factor that
    forced_photometry derives from the beam at the image centre (see its docstring and code: the
    mesh masks +-h around each source, or +-1 BMAJ when that would hide over half the image)."""
    ny, nx = data.shape
    ra_c, dec_c = wcs.pixel_to_world_values(0.5 * (nx - 1), 0.5 * (ny - 1))
    cov = beam_covariance_pixels(wcs, beam, float(ra_c), float(dec_c))[0]
    major_pix = FWHM_PER_SIGMA * math.sqrt(float(np.linalg.eigvalsh(cov)[-1]))
    half = max(1, math.ceil(0.5 * STAMP_BEAMS * major_pix))
    return {
        "half": half,
        "mask_half": (half, math.ceil(major_pix)),
        "box": max(1, round(MESH_BEAMS * major_pix)),
        "stride": max(1, math.floor(major_pix / 2.5 + 1e-6)),
        "factor": correlated_noise_factor(cov, half, "beam"),
    }


def _source_mask(shape, positions, half: int) -> np.ndarray:
    """True within +-half pixels of every position, one source at a time."""
    mask = np.zeros(shape, dtype=bool)
    for x, y in positions:
        cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
        mask[max(cy - half, 0) : cy + half + 1, max(cx - half, 0) : cx + half + 1] = True
    return mask


def per_source_loop(data: np.ndarray, wcs, beam, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Peak fluxes (Jy/beam) one source at a time; the background/RMS mesh is computed once.

    Returns an (N, 3) array of (peak, error, background) in Jy/beam; NaN where the stamp leaves
    the image.
    """
    geo = _image_geometry(data, wcs, beam)
    ny, nx = data.shape
    h = geo["half"]
    positions = [wcs.world_to_pixel_values(r, d) for r, d in zip(ra, dec, strict=True)]
    mask = _source_mask(data.shape, positions, geo["mask_half"][0])
    if mask.mean() > 0.5:
        mask = _source_mask(data.shape, positions, geo["mask_half"][1])
    bkg, rms = background_and_rms(data, geo["box"], mask=mask, stride=geo["stride"])
    off = np.arange(-h, h + 1, dtype=float)
    out = np.full((len(positions), 3), np.nan)
    for i, (x, y) in enumerate(positions):
        x, y = float(x), float(y)
        cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
        if cx - h < 0 or cy - h < 0 or cx + h > nx - 1 or cy + h > ny - 1:
            continue
        icov = np.linalg.inv(beam_covariance_pixels(wcs, beam, ra[i], dec[i])[0])
        dx = (cx + off - x)[None, :]
        dy = (cy + off - y)[:, None]
        kernel = np.exp(
            -0.5 * (icov[0, 0] * dx * dx + 2 * icov[0, 1] * dx * dy + icov[1, 1] * dy * dy)
        )
        stamp = data[cy - h : cy + h + 1, cx - h : cx + h + 1]
        valid = np.isfinite(stamp)
        b = sample_mesh(bkg, geo["box"], x, y, shape=data.shape)
        kw = np.where(valid, kernel, 0.0)
        out[i, 0] = np.sum(kw * np.where(valid, stamp - b, 0.0)) / np.sum(kw * kernel)
        out[i, 1] = geo["factor"] * sample_mesh(rms, geo["box"], x, y, shape=data.shape)
        out[i, 2] = b
    return out


def one_call_per_source(data, wcs, beam, ra, dec) -> np.ndarray:
    """``forced_photometry`` of each source on its own (image already in memory)."""
    return np.array(
        [
            forced_photometry(data, wcs, beam, ra[i : i + 1], dec[i : i + 1]).peak_jyb[0]
            for i in range(ra.size)
        ]
    )


def reread_per_source(path: str, catalog, rows: np.ndarray) -> np.ndarray:
    """The seed's pattern: open and read the FITS file again for every source, then measure it."""
    peaks = []
    for i in rows:
        image = load_image(path)
        info = image.info
        phot = forced_photometry(
            image.data, info.wcs, info.beam, catalog.ra_deg[i : i + 1], catalog.dec_deg[i : i + 1]
        )
        peaks.append(phot.peak_jyb[0])
    return np.array(peaks)


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def deviation_sigma(ref, ref_err, other, select) -> tuple[str, str, str]:
    """(count, median, max) of |other - ref| / ref_err over the selected, finite sources."""
    sel = select & np.isfinite(ref) & np.isfinite(other) & np.isfinite(ref_err)
    if not sel.any():
        return "0", "n/a", "n/a"
    dev = np.abs(other[sel] - ref[sel]) / ref_err[sel]
    return f"{int(sel.sum())}", f"{np.median(dev):.2e}", f"{np.max(dev):.2e}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    n, k = args.sources, max(1, min(args.sample, args.sources))
    print_header(
        "bench_photometry: forced photometry of one image, vectorized vs one source at a time",
        [
            f"image {args.npix}x{args.npix} px (float32 FITS), {n} point sources, "
            f"beam-correlated noise (core.simulate); median of {args.repeat} runs for the "
            "vectorized rows",
            f"one-call-per-source rows: {k} sources timed, per-source time x {n} (extrapolated)",
            "ratio = time of the row / time of 'vectorized, image in memory' (higher = slower)",
        ],
    )
    field = make_field(args.npix, n, rng)
    cat = field.catalog
    with temp_dir("photometry") as tmp:
        path = str(write_field_fits(field, tmp / "field.fits", "2025-01-01T02:00:00"))
        image = load_image(path)
        data, wcs, beam = image.data, image.info.wcs, image.info.beam
        ra, dec = cat.ra_deg, cat.dec_deg
        sample = np.sort(rng.choice(n, k, replace=False))

        vec = time_call(lambda: forced_photometry(data, wcs, beam, ra, dec), args.repeat)
        from_file = time_call(
            lambda: forced_photometry(load_image(path).data, wcs, beam, ra, dec), args.repeat
        )
        loop = time_call(lambda: per_source_loop(data, wcs, beam, ra, dec))
        calls = time_call(lambda: one_call_per_source(data, wcs, beam, ra[sample], dec[sample]))
        reread = time_call(lambda: reread_per_source(path, cat, sample))
        mem_vec = peak_traced_mib(lambda: forced_photometry(data, wcs, beam, ra, dec))
        mem_file = peak_traced_mib(
            lambda: forced_photometry(load_image(path).data, wcs, beam, ra, dec)
        )
        mem_one = peak_traced_mib(lambda: forced_photometry(data, wcs, beam, ra[:1], dec[:1]))
        mem_loop = peak_traced_mib(lambda: per_source_loop(data, wcs, beam, ra, dec))

    report_speed(n, k, vec, from_file, loop, calls, reread)
    report_agreement(vec.value, loop.value, calls.value, sample)
    report_memory(data, mem_vec, mem_file, mem_one, mem_loop)
    return 0


def report_speed(
    n: int, k: int, vec: Timing, from_file: Timing, loop: Timing, calls: Timing, reread: Timing
) -> None:
    base = vec.median
    extrap = n / k
    rows = [
        ("vectorized, image in memory (baseline)", vec.median, "measured"),
        ("vectorized, load_image + photometry", from_file.median, "measured"),
        ("per-source Python loop, mesh once", loop.median, "measured"),
        ("forced_photometry called per source", calls.median * extrap, f"{k} timed, extrapolated"),
        ("seed: re-read FITS per source", reread.median * extrap, f"{k} timed, extrapolated"),
    ]
    print_table(
        ["method", f"time / image ({n} src)", "sources/s", "ratio", "how"],
        [(name, fmt_seconds(t), fmt_rate(n, t), fmt_ratio(t / base), how) for name, t, how in rows],
    )


def report_agreement(vec, loop: np.ndarray, calls: np.ndarray, sample: np.ndarray) -> None:
    """The baselines measure the same thing: differences in units of the vectorized error."""
    flags = vec.quality_flag
    isolated = flags == 0
    blended = (flags & FLAG_BLENDED) != 0
    peak, err = vec.peak_jyb, vec.peak_err_jyb
    rows = [
        ("loop: peak, isolated sources", *deviation_sigma(peak, err, loop[:, 0], isolated)),
        (
            "loop: background (mesh) at isolated",
            *deviation_sigma(vec.background_jyb, err, loop[:, 2], isolated),
        ),
        ("loop: peak, blended (fitted alone)", *deviation_sigma(peak, err, loop[:, 0], blended)),
        (
            "one call per source: peak, isolated",
            *deviation_sigma(peak[sample], err[sample], calls, isolated[sample]),
        ),
    ]
    print(
        "agreement with the vectorized result, |difference| / sigma_F (a one-source call masks "
        "only that source in its mesh,\nhence small differences; blended sources are fitted "
        "jointly only by the vectorized code):"
    )
    print_table(["comparison", "sources", "median", "max"], rows)
    n_edge = int(((flags & FLAG_EDGE) != 0).sum())
    if n_edge:
        print(f"({n_edge} sources too close to the edge were not measured by any method)\n")


def report_memory(
    data: np.ndarray, mem_vec: float, mem_file: float, mem_one: float, mem_loop: float
) -> None:
    image_mib = data.nbytes / 2**20
    rows = [
        ("vectorized, image in memory", f"{mem_vec:.1f}", fmt_ratio(mem_vec / image_mib)),
        ("vectorized, load_image + photometry", f"{mem_file:.1f}", fmt_ratio(mem_file / image_mib)),
        ("per-source Python loop, mesh once", f"{mem_loop:.1f}", fmt_ratio(mem_loop / image_mib)),
        ("forced_photometry of one source", f"{mem_one:.1f}", fmt_ratio(mem_one / image_mib)),
    ]
    print(
        f"peak memory per image (tracemalloc: peak heap growth during the call; the image array "
        f"itself is {image_mib:.1f} MiB {data.dtype}):"
    )
    print_table(["method", "peak MiB", "x image size"], rows)
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS over the whole benchmark: {maxrss_mib:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())

"""Forced photometry of one image: ours against the FITS read, the peers and per-source baselines.

For each source count (default 1 000 and 10 000 on a 2048x2048 float32 image), all on the same
simulated image in the same process:

* ours, image in memory (**the measured figure**): ``forced_photometry(data, wcs, beam, ra, dec)``,
  background and noise mesh included;
* FITS read (**the I/O floor**): ``load_image`` of the file (what ``pipeline.measure_image`` reads
  once per image), and ours from the file (``load_image`` + the same call);
* askap-vast ``forced_phot`` with numba (**peer**): ``ForcedPhot(image, background, noise,
  use_numba=True).measure(positions)`` with its default 3-beam stamps and 1.5 BMAJ clusters. It
  needs background and noise maps: it is given constant maps of the true values (their
  computation is not timed, so this is its best case). Compiled once before timing;
* photutils aperture photometry with an annulus background (**peer**): ``CircularAperture`` of
  radius 1.5 BMAJ (the footprint of our 3-beam stamp), the sigma-clipped median of a
  ``CircularAnnulus`` of 2-3 BMAJ (``ApertureStats``), ``aperture_photometry``; flux = (sum -
  median x area) / beam area in pixels;
* per-source baselines: the same estimator as a Python loop over sources (mesh once);
  ``forced_photometry`` with one source per call; the seed system's re-read of the FITS file per
  source (the last two timed on a sample and extrapolated).

Peers that cannot be imported are reported as such, with the reason, never given a number.
forced_phot is not on PyPI: pass a checkout of askap-vast/forced_phot (GitHub) with
``--forced-phot-src DIR`` or ``FORCED_PHOT_SRC=DIR``; numba and photutils come with
``pip install -c requirements.lock -e '.[bench]'``.

Run: ``.venv/bin/python benchmarks/bench_photometry.py [--npix 2048] [--sources 1000,10000]``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import resource
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
#: Noise of the simulated image (make_field's default), Jy/beam: the peers' noise map.
RMS_JYB = 0.5e-3

#: Targets of issue 7 part 2, on a 2048^2 float32 image: seconds per image by source count,
#: and peak memory as a multiple of the image.
TARGET_SECONDS = {1000: 0.1, 10000: 0.3}
TARGET_MEMORY_X = 4.0


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
    parser.add_argument(
        "--sample",
        type=int,
        default=25,
        help="sources timed for the one-call-per-source baselines, which are then "
        "extrapolated to the source count (default: %(default)s)",
    )
    parser.add_argument(
        "--forced-phot-src",
        default=os.environ.get("FORCED_PHOT_SRC"),
        help="directory of a checkout of askap-vast/forced_phot (default: $FORCED_PHOT_SRC, "
        "else an installed forced_phot)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip forced_phot and photutils")
    return add_common_arguments(parser, repeat=5).parse_args(argv)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A peer method, or why it is absent. ``prepare(path, image)`` builds its inputs (not
    timed); ``run(inputs, ra, dec)`` returns the fluxes (Jy), timed."""

    name: str
    prepare: Callable | None = None
    run: Callable | None = None
    missing: str = ""


def forced_phot_peer(src: str | None) -> Peer:
    name = "askap-vast forced_phot (numba)"
    try:
        importlib.import_module("numba")
    except ImportError as err:
        return Peer(name, missing=f"numba not installed ({err}); pip install -e '.[bench]'")
    if src:
        sys.path.insert(0, str(Path(src).resolve()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forced_phot = importlib.import_module("forced_phot")
    except ImportError as err:
        return Peer(
            name,
            missing=f"forced_phot not importable ({err}): pass --forced-phot-src with a "
            "checkout of askap-vast/forced_phot",
        )
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.io import fits

    def run(hduls, ra, dec):
        image, background, noise = hduls
        phot = forced_phot.ForcedPhot(image, background, noise, use_numba=True)
        flux, *_ = phot.measure(SkyCoord(ra * u.deg, dec * u.deg), cluster_threshold=1.5)
        return np.asarray(flux, dtype=float)

    def prepare(path: str, _image):
        """Image, background and noise HDULists in memory (data read before timing)."""
        image = fits.open(path, memmap=False)
        header = image[0].header
        data = image[0].data
        background = fits.HDUList([fits.PrimaryHDU(np.zeros_like(data), header=header)])
        noise = fits.HDUList([fits.PrimaryHDU(np.full_like(data, RMS_JYB), header=header)])
        return image, background, noise

    return Peer(name, prepare=prepare, run=run)


def photutils_peer() -> Peer:
    name = "photutils aperture + annulus"
    try:
        from astropy.stats import SigmaClip
        from photutils.aperture import (
            ApertureStats,
            CircularAnnulus,
            CircularAperture,
            aperture_photometry,
        )
    except ImportError as err:
        return Peer(name, missing=f"photutils not installed ({err}); pip install -e '.[bench]'")

    def run(image, ra, dec):
        data, wcs, beam = image.data, image.info.wcs, image.info.beam
        ny, nx = data.shape
        ra_c, dec_c = wcs.pixel_to_world_values(0.5 * (nx - 1), 0.5 * (ny - 1))
        cov = beam_covariance_pixels(wcs, beam, float(ra_c), float(dec_c))[0]
        major_pix = FWHM_PER_SIGMA * math.sqrt(float(np.linalg.eigvalsh(cov)[-1]))
        beam_area_pix = 2.0 * math.pi * math.sqrt(float(np.linalg.det(cov)))
        xy = np.column_stack(wcs.world_to_pixel_values(ra, dec))
        aperture = CircularAperture(xy, r=1.5 * major_pix)
        annulus = CircularAnnulus(xy, r_in=2.0 * major_pix, r_out=3.0 * major_pix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sky = ApertureStats(data, annulus, sigma_clip=SigmaClip(sigma=3.0, maxiters=5)).median
            total = np.asarray(aperture_photometry(data, aperture)["aperture_sum"], dtype=float)
        return (total - np.asarray(sky, dtype=float) * aperture.area) / beam_area_pix

    return Peer(name, prepare=lambda _path, image: image, run=run)


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


@dataclass
class Run:
    """Everything measured on one image with ``n`` sources."""

    n: int
    image_mib: float
    read: Timing
    ours: Timing
    ours_file: Timing
    loop: Timing
    calls: Timing
    reread: Timing
    sample: np.ndarray
    truth_jy: np.ndarray
    peers: dict[str, Timing | str] = field(default_factory=dict)
    memory_mib: dict[str, float] = field(default_factory=dict)


def measure(args: argparse.Namespace, n: int, rng: np.random.Generator, peers: list[Peer]) -> Run:
    k = max(1, min(args.sample, n))
    sim = make_field(args.npix, n, rng)
    cat = sim.catalog
    ra, dec = cat.ra_deg, cat.dec_deg
    with temp_dir("photometry") as tmp:
        path = str(write_field_fits(sim, tmp / "field.fits", "2025-01-01T02:00:00"))
        image = load_image(path)
        data, wcs, beam = image.data, image.info.wcs, image.info.beam
        sample = np.sort(rng.choice(n, k, replace=False))
        forced_photometry(data, wcs, beam, ra, dec)  # warm caches (WCS, numpy) before timing
        run = Run(
            n=n,
            image_mib=data.nbytes / 2**20,
            read=time_call(lambda: load_image(path), args.repeat),
            ours=time_call(lambda: forced_photometry(data, wcs, beam, ra, dec), args.repeat),
            ours_file=time_call(
                lambda: forced_photometry(load_image(path).data, wcs, beam, ra, dec), args.repeat
            ),
            loop=time_call(lambda: per_source_loop(data, wcs, beam, ra, dec)),
            calls=time_call(lambda: one_call_per_source(data, wcs, beam, ra[sample], dec[sample])),
            reread=time_call(lambda: reread_per_source(path, cat, sample)),
            sample=sample,
            truth_jy=cat.flux_mjy / 1e3,
        )
        run.memory_mib["ours, image in memory"] = peak_traced_mib(
            lambda: forced_photometry(data, wcs, beam, ra, dec)
        )
        run.memory_mib["ours, load_image + photometry"] = peak_traced_mib(
            lambda: forced_photometry(load_image(path).data, wcs, beam, ra, dec)
        )
        run.memory_mib["FITS read alone (load_image)"] = peak_traced_mib(lambda: load_image(path))
        for peer in peers:
            if peer.missing:
                run.peers[peer.name] = peer.missing
                continue
            inputs = peer.prepare(path, image)
            peer.run(inputs, ra[:5], dec[:5])  # warm up (numba compiles here)
            run.peers[peer.name] = time_call(
                lambda p=peer, i=inputs: p.run(i, ra, dec), args.repeat, max_seconds=20.0
            )
    return run


def report_speed(run: Run) -> None:
    n, k = run.n, run.sample.size
    base = run.ours.median
    read = run.read.median
    extrap = n / k
    rows = [
        ("FITS read alone (load_image): I/O floor", run.read, 1.0, "measured"),
        ("ours, image in memory (baseline)", run.ours, 1.0, "measured"),
        ("ours, load_image + photometry", run.ours_file, 1.0, "measured"),
    ]
    for name, timing in run.peers.items():
        if isinstance(timing, Timing):
            rows.append((f"peer: {name}", timing, 1.0, f"measured x{len(timing.seconds)}"))
    rows += [
        ("per-source Python loop, mesh once", run.loop, 1.0, "measured"),
        ("forced_photometry called per source", run.calls, extrap, f"{k} timed, extrap."),
        ("seed: re-read FITS per source", run.reread, extrap, f"{k} timed, extrap."),
    ]
    print(f"speed, {n} sources (median of the runs; ratio = median time of the row / of ours):")
    print_table(
        ["method", "time / image", "best", "sources/s", "vs ours", "vs FITS read", "how"],
        [
            (
                name,
                fmt_seconds(t.median * scale),
                fmt_seconds(t.best * scale),
                fmt_rate(n, t.median * scale),
                fmt_ratio(t.median * scale / base),
                fmt_ratio(t.median * scale / read),
                how,
            )
            for name, t, scale, how in rows
        ],
    )
    for name, timing in run.peers.items():
        if not isinstance(timing, Timing):
            print(f"peer {name}: NOT MEASURED: {timing}")


def accuracy_row(name: str, flux: np.ndarray, truth: np.ndarray, select: np.ndarray):
    """(name, measured, median (F - F_true) / rms, std (F - F_true) / rms) over ``select``."""
    ok = select & np.isfinite(flux)
    if not ok.any():
        return (name, "0", "n/a", "n/a")
    dev = (flux[ok] - truth[ok]) / RMS_JYB
    return (name, f"{int(ok.sum())}", f"{np.median(dev):+.3f}", f"{np.std(dev, ddof=1):.3f}")


def report_accuracy(run: Run, peer_flux: dict[str, np.ndarray]) -> None:
    """Fluxes against the injected truth on sources that none of the methods treats as blended
    or edge (our flag 0), in units of the image noise: a speed-up bought with a worse answer
    would show here."""
    vec = run.ours.value
    isolated = vec.quality_flag == 0
    rows = [accuracy_row("ours", vec.peak_jyb, run.truth_jy, isolated)]
    rows += [accuracy_row(name, f, run.truth_jy, isolated) for name, f in peer_flux.items()]
    print(
        "accuracy on isolated sources against the injected fluxes, in units of the image noise "
        f"({RMS_JYB * 1e3:.1f} mJy/beam;\nneighbours beyond the blend radius add a little "
        "confusion at high source density):"
    )
    print_table(["method", "sources", "median (F-F_true)/rms", "std (F-F_true)/rms"], rows)

    flags = vec.quality_flag
    blended = (flags & FLAG_BLENDED) != 0
    peak, err = vec.peak_jyb, vec.peak_err_jyb
    loop, calls, sample = run.loop.value, run.calls.value, run.sample
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
        "agreement of the per-source baselines with ours, |difference| / sigma_F (a one-source "
        "call masks only that source in its mesh,\nhence small differences; blended sources are "
        "fitted jointly only by ours):"
    )
    print_table(["comparison", "sources", "median", "max"], rows)
    n_edge = int(((flags & FLAG_EDGE) != 0).sum())
    if n_edge:
        print(f"({n_edge} sources too close to the edge were not measured by any method)\n")


def deviation_sigma(ref, ref_err, other, select) -> tuple[str, str, str]:
    """(count, median, max) of |other - ref| / ref_err over the selected, finite sources."""
    sel = select & np.isfinite(ref) & np.isfinite(other) & np.isfinite(ref_err)
    if not sel.any():
        return "0", "n/a", "n/a"
    dev = np.abs(other[sel] - ref[sel]) / ref_err[sel]
    return f"{int(sel.sum())}", f"{np.median(dev):.2e}", f"{np.max(dev):.2e}"


def report_memory(run: Run) -> None:
    print(
        f"peak memory, {run.n} sources (tracemalloc: peak heap growth during the call, numpy "
        f"buffers included; the image is {run.image_mib:.1f} MiB float32):"
    )
    print_table(
        ["call", "peak MiB", "x image size"],
        [
            (name, f"{mib:.1f}", fmt_ratio(mib / run.image_mib))
            for name, mib in run.memory_mib.items()
        ],
    )


def report_targets(runs: list[Run]) -> None:
    """Each target of issue 7 part 2 with the figure measured in this run, met or missed."""
    rows = []
    for run in runs:
        t = run.ours.median
        if run.n in TARGET_SECONDS:
            goal = TARGET_SECONDS[run.n]
            rows.append(
                (f"photometry, {run.n} sources: <= {goal} s", fmt_seconds(t), verdict(t <= goal))
            )
        for name, timing in run.peers.items():
            if isinstance(timing, Timing):
                ratio = t / timing.median
                rows.append(
                    (
                        f"faster than {name}, {run.n} sources",
                        f"{fmt_ratio(ratio)} its time",
                        verdict(ratio < 1.0),
                    )
                )
            else:
                rows.append((f"faster than {name}, {run.n} sources", "not measured", "UNKNOWN"))
        mem = run.memory_mib["ours, image in memory"] / run.image_mib
        rows.append(
            (
                f"peak memory, {run.n} sources: <= {TARGET_MEMORY_X:g}x image",
                fmt_ratio(mem),
                verdict(mem <= TARGET_MEMORY_X),
            )
        )
        rows.append(
            (
                f"I/O floor, {run.n} sources: ours / FITS read",
                fmt_ratio(t / run.read.median),
                "(figure)",
            )
        )
    print(f"targets (issue 7 part 2; image {runs[0].image_mib:.0f} MiB):")
    print_table(["target", "measured", "verdict"], rows)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    counts = [int(c) for c in str(args.sources).split(",") if c.strip()]
    peers = [] if args.no_peers else [forced_phot_peer(args.forced_phot_src), photutils_peer()]
    print_header(
        "bench_photometry: forced photometry of one image, against the FITS read and the peers",
        [
            f"image {args.npix}x{args.npix} px (float32 FITS), {counts} point sources of "
            "3-100 mJy, beam-correlated noise of 0.5 mJy/beam (core.simulate); "
            f"median of {args.repeat} runs for the fast rows",
            f"one-call-per-source rows: {args.sample} sources timed, x source count (extrapolated)",
            "peers: "
            + (
                ", ".join(p.name + (" (not available)" if p.missing else "") for p in peers)
                or "skipped (--no-peers)"
            ),
        ],
    )
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    runs = []
    for n in counts:
        run = measure(args, n, rng, peers)
        runs.append(run)
        report_speed(run)
        peer_flux = {
            name: timing.value for name, timing in run.peers.items() if isinstance(timing, Timing)
        }
        report_accuracy(run, peer_flux)
        report_memory(run)
    report_targets(runs)
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS over the whole benchmark: {maxrss_mib:.0f} MiB")
    print(
        f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} (other work on the machine "
        "slows every row; the ratios within one table are what to compare)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

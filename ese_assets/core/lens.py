"""One-dimensional Gaussian plasma lens (Clegg, Fey & Lazio 1998, ApJ 496, 253).

A refracting plasma structure with a Gaussian electron-column profile N_e(x) ~ exp(-(x/a)^2) drifts
across the line of sight. In units of the lens width, u = x/a, a ray arriving at u in the lens plane
is seen from the observer at u' where (CFL98, diverging lens)

    u' = u (1 + alpha^2 exp(-u^2))                                   (lens equation)

and alpha sets the strength: alpha^2 ~ lambda^2 r_e N_0 D / (pi a^2) (N_0 the peak column, D the
observer-lens distance), so alpha is proportional to wavelength, i.e. 1/frequency. The point-source
gain at observer position u' is the sum over all images u_i solving the lens equation of the
inverse Jacobian,

    G(u') = sum_i |du'/du|^-1 = sum_i |1 + alpha^2 (1 - 2 u_i^2) exp(-u_i^2)|^-1.

Properties used in the tests:
- On axis (u' = 0) the only image is u = 0 and G = 1/(1 + alpha^2): depth alpha^2 / (1 + alpha^2).
- du'/du vanishes (caustics, G -> infinity, three images) iff max_w (2w - 1) e^{-w} = 2 e^{-3/2}
  exceeds 1/alpha^2, i.e. alpha^2 > e^{3/2}/2 (alpha > 1.4966).
- Flux conservation: integral of (G - 1) du' over the whole line is zero, because
  integral G(u') du' over an interval equals the length of its pre-image in u; the flux missing in
  the dip reappears in the bracketing enhancements (caustics).
- Far from the lens (|u'| >> 1) G -> 1.

Time enters through the drift: u' = (t - t0) / T. In this package an ESE's ``duration_days`` is
4 T, i.e. the event is taken to span |u'| < 2 (|t - t0| < duration / 2), which contains the dip and
its enhancements for alpha <~ 1.5 (they peak near |u'| ~ 1.3-2).
"""

from __future__ import annotations

import math

import numpy as np

#: Caustics (multiple images) appear when alpha^2 exceeds e^{3/2}/2 (alpha > 1.4966).
ALPHA2_CAUSTIC = math.exp(1.5) / 2.0
#: Number of bisection steps: brackets shrink by 2^-64, below double precision for |u'| < 1e4.
_BISECT_STEPS = 64
#: Upper bound on the number of (row x grid) samples evaluated at once in the finite-source
#: integral.
_CHUNK_SAMPLES = 2_000_000


def alpha_for_depth(depth_frac):
    """Lens strength alpha giving on-axis point-source depth ``depth_frac`` = 1 - G(0).

    G(0) = 1/(1 + alpha^2) so depth = alpha^2 / (1 + alpha^2) and alpha = sqrt(depth / (1 - depth)).
    Valid for 0 <= depth < 1; returns a float for scalar input, an array otherwise.
    """
    d = np.asarray(depth_frac, dtype=float)
    if np.any((d < 0) | (d >= 1) | ~np.isfinite(d)):
        raise ValueError(f"depth_frac must be in [0, 1), got {depth_frac!r}")
    alpha = np.sqrt(d / (1.0 - d))
    return float(alpha) if alpha.ndim == 0 else alpha


def lens_map(u, alpha):
    """Observer-plane position u' = u (1 + alpha^2 exp(-u^2)) of a ray through lens-plane u."""
    u = np.asarray(u, dtype=float)
    return u * (1.0 + np.asarray(alpha, dtype=float) ** 2 * np.exp(-u * u))


def lens_jacobian(u, alpha):
    """du'/du = 1 + alpha^2 (1 - 2 u^2) exp(-u^2)."""
    u = np.asarray(u, dtype=float)
    return 1.0 + np.asarray(alpha, dtype=float) ** 2 * (1.0 - 2.0 * u * u) * np.exp(-u * u)


def _bisect(func, lo, hi, target, increasing):
    """Vectorized bisection for func(u) = target on monotone brackets [lo, hi]."""
    lo = lo.copy()
    hi = hi.copy()
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        below = (func(mid) < target) == increasing  # root lies above mid
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _critical_points(alpha2):
    """Positive roots u1 < u2 of du'/du = 0 (NaN where alpha^2 <= ALPHA2_CAUSTIC).

    With w = u^2, du'/du = 0 <=> (2w - 1) e^{-w} = 1/alpha^2; the left side rises on [1/2, 3/2] and
    falls on [3/2, inf), so each branch has exactly one root, found by bisection.
    """
    caustic = alpha2 > ALPHA2_CAUSTIC
    a2 = np.where(caustic, alpha2, 2 * ALPHA2_CAUSTIC)  # placeholder keeps the brackets valid
    target = 1.0 / a2

    def g(w):
        return (2.0 * w - 1.0) * np.exp(-w)

    w1 = _bisect(g, np.full_like(a2, 0.5), np.full_like(a2, 1.5), target, True)
    w_hi = 1.5 + 2.0 * np.log(a2) + 20.0  # g(w) < 2 w e^{-w} is far below 1/alpha^2 there
    w2 = _bisect(g, np.full_like(a2, 1.5), w_hi, target, False)
    return np.where(caustic, np.sqrt(w1), np.nan), np.where(caustic, np.sqrt(w2), np.nan)


def lens_images(u_prime, alpha):
    """All images (lens-plane roots u_i) of observer positions u', and their gains.

    Returns ``(roots, gains)`` with shape ``broadcast(u_prime, alpha).shape + (5,)``, NaN where a
    slot
    holds no image. The lens map is monotone between its critical points -u2 < -u1 < u1 < u2
    (:func:`_critical_points`), so there are at most five monotone segments; on each, the segment's
    value range says whether it holds a root and a vectorized bisection finds it:
    slots 0..4 = (-inf, -u2], [-u2, -u1], [-u1, u1], [u1, u2], [u2, inf). Without caustics slot 2
    holds the single image (bracket [min(0, u'), max(0, u')], since |u| <= |u'| and
    sign(u) = sign(u')).
    Exactly at a caustic value two images merge and both carry infinite gain.
    """
    t, alpha_b = np.broadcast_arrays(
        np.asarray(u_prime, dtype=float), np.asarray(alpha, dtype=float)
    )
    shape = t.shape
    t = t.ravel()
    a2 = alpha_b.ravel() ** 2

    def f(u):
        return u * (1.0 + a2 * np.exp(-u * u))

    u1, u2 = _critical_points(a2)
    caustic = np.isfinite(u1)
    f1 = np.where(caustic, f(np.nan_to_num(u1)), np.nan)  # local max at u1
    f2 = np.where(caustic, f(np.nan_to_num(u2)), np.nan)  # local min at u2
    roots = np.full((*t.shape, 5), np.nan)
    zero = np.zeros_like(t)
    uu1, uu2 = np.nan_to_num(u1), np.nan_to_num(u2)
    segments = [
        # (lo, hi, increasing, has_root)
        (np.minimum(t, -uu2), -uu2, True, caustic & (t <= -f2)),
        (-uu2, -uu1, False, caustic & (t >= -f1) & (t <= -f2)),
        (
            np.where(caustic, -uu1, np.minimum(t, zero)),
            np.where(caustic, uu1, np.maximum(t, zero)),
            True,
            ~caustic | ((t >= -f1) & (t <= f1)),
        ),
        (uu1, uu2, False, caustic & (t >= f2) & (t <= f1)),
        (uu2, np.maximum(t, uu2), True, caustic & (t >= f2)),
    ]
    for k, (lo, hi, inc, has) in enumerate(segments):
        if not has.any():
            continue
        idx = np.nonzero(has)[0]
        a2k = a2[idx]
        root = _bisect(
            lambda u, a2k=a2k: u * (1.0 + a2k * np.exp(-u * u)),
            np.asarray(lo)[idx] if np.ndim(lo) else lo,
            np.asarray(hi)[idx] if np.ndim(hi) else hi,
            t[idx],
            inc,
        )
        roots[idx, k] = root
    with np.errstate(divide="ignore"):
        gains = 1.0 / np.abs(1.0 + a2[:, None] * (1.0 - 2.0 * roots**2) * np.exp(-(roots**2)))
    return roots.reshape((*shape, 5)), gains.reshape((*shape, 5))


def _point_gain(u_prime, alpha):
    _, gains = lens_images(u_prime, alpha)
    return np.nansum(gains, axis=-1)


def preimage_excess(u_prime, alpha):
    """Q(u') = |{u : u'(u) <= u'}| - u', the excess length of the pre-image of (-inf, u'].

    The set {u : u'(u) <= v} is (-inf, r1] or (-inf, r1] U [r2, r3] for images r1 < r2 < r3, so
    Q(v) = r1 - r2 + r3 - v (alternating sum of the ordered images). Q is continuous and bounded,
    Q -> 0 for |v| -> inf (u = u' far from the lens), and dQ/dv = G(v) - 1: the point-source gain is
    the derivative of the pre-image length. Hence integral (G - 1) dv = 0 (flux conservation) and a
    finite-source gain can be integrated against Q instead of the singular G.
    """
    v = np.asarray(u_prime, dtype=float)
    roots, _ = lens_images(v, alpha)
    ok = np.isfinite(roots)
    rank = np.cumsum(ok, axis=-1) - 1  # slots are ordered by position in u
    sign = np.where(rank % 2 == 0, 1.0, -1.0)
    return np.sum(np.where(ok, sign * roots, 0.0), axis=-1) - v


def _finite_source_gain(t, alpha, sigma):
    """G_s(u') = integral G(v) N(v - u'; sigma) dv for one lens (alpha) and one source size sigma.

    With G = 1 + dQ/dv (:func:`preimage_excess`) and integration by parts,
    G_s(u') = 1 + integral Q(v) (v - u') / sigma^2 N(v - u'; sigma) dv, whose integrand is bounded
    even across caustics. Trapezoid rule on the fixed grid v_j = j h, h = min(sigma / 40, 0.01),
    over |v - u'| < 8 sigma (kernel < e^-32 beyond); Q is evaluated only at the grid nodes that some
    target needs. Targets farther than 8 sigma from the lens region (|u'| > L, where
    alpha^2 exp(-L^2) < 1e-14 so Q = 0) get exactly 1.
    """
    out = np.ones_like(t)
    a2 = alpha * alpha
    if a2 == 0:
        return out
    half = math.sqrt(max(math.log(a2) + 33.0, 1.0))
    step = min(sigma / 40.0, 0.01)
    reach = math.ceil(8.0 * sigma / step) + 1
    near = np.nonzero(np.abs(t) < half + 8.0 * sigma)[0]
    if near.size == 0:
        return out
    offsets = np.arange(-reach, reach + 1)
    rows = max(1, _CHUNK_SAMPLES // offsets.size)
    norm = step / (sigma**3 * math.sqrt(2.0 * math.pi))
    for start in range(0, near.size, rows):
        idx = near[start : start + rows]
        j = np.rint(t[idx] / step).astype(np.int64)[:, None] + offsets[None, :]
        nodes, inverse = np.unique(j, return_inverse=True)
        q_nodes = preimage_excess(nodes * step, alpha)
        dv = j * step - t[idx, None]
        q = q_nodes[inverse.reshape(j.shape)]
        out[idx] = 1.0 + norm * np.sum(q * dv * np.exp(-0.5 * (dv / sigma) ** 2), axis=1)
    return out


def gaussian_lens_gain(u_prime, alpha, source_size=0.0) -> np.ndarray:
    """Flux gain of a source at observer-plane position u' behind a 1-D Gaussian lens (CFL98).

    ``source_size`` (same units as u', i.e. the lens width a) is the standard deviation of a
    Gaussian source brightness profile; the gain is then G convolved with that Gaussian in u'
    (integrated against the pre-image excess, see :func:`_finite_source_gain`), which caps the
    caustic
    spikes. ``source_size = 0`` gives the point-source gain sum_i |du'/du|^-1 over all images
    (:func:`lens_images`). ``u_prime``, ``alpha`` and ``source_size`` broadcast; returns an array.
    """
    t, alpha_b, size_b = np.broadcast_arrays(
        np.asarray(u_prime, dtype=float),
        np.asarray(alpha, dtype=float),
        np.asarray(source_size, dtype=float),
    )
    if np.any(size_b < 0) or np.any(~np.isfinite(alpha_b)):
        raise ValueError("source_size must be >= 0 and alpha finite")
    shape = t.shape
    t, alpha_b, size_b = t.ravel(), alpha_b.ravel(), size_b.ravel()
    gain = np.empty_like(t)
    point = size_b == 0
    if point.any():
        gain[point] = _point_gain(t[point], alpha_b[point])
    if (~point).any():
        # One quadrature per distinct (alpha, source_size): a handful of lenses, never one per
        # sample.
        ext = np.nonzero(~point)[0]
        pairs, which = np.unique(
            np.stack([alpha_b[ext], size_b[ext]], axis=1), axis=0, return_inverse=True
        )
        for k, (a, s) in enumerate(pairs):
            sel = ext[which.ravel() == k]
            gain[sel] = _finite_source_gain(t[sel], float(a), float(s))
    return gain.reshape(shape)


def ese_lightcurve(mjd, t0_mjd, duration_days, depth_frac, source_size=0.05) -> np.ndarray:
    """Multiplicative flux gain of an ESE at times ``mjd``.

    u' = (t - t0) / T with T = duration_days / 4 (so the event, |u'| < 2, lasts duration_days and is
    centred on t0); alpha = :func:`alpha_for_depth` (depth_frac), so a point source would dip by
    exactly depth_frac at t0 (a finite ``source_size`` in lens units makes the dip slightly
    shallower and rounds the enhancements). All arguments broadcast.
    """
    duration = np.asarray(duration_days, dtype=float)
    if np.any(duration <= 0):
        raise ValueError("duration_days must be > 0")
    u_prime = (np.asarray(mjd, dtype=float) - np.asarray(t0_mjd, dtype=float)) / (duration / 4.0)
    return gaussian_lens_gain(u_prime, alpha_for_depth(depth_frac), source_size)

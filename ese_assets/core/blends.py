"""Close pairs: friends-of-friends clusters and the joint amplitude fit of each cluster.

Sources of the input list closer than the linking length (1.5 beam majors by default) bias each
other's single-source fits. Clusters are found with friends-of-friends on a hash grid, and the
amplitudes of each cluster are solved jointly (the model is linear in the amplitudes with fixed
positions and shapes): ``A a = b``, ``A_mn = sum K_m K_n w``, ``b_m = sum d K_m w`` over the
union of the members' stamps (w = 0 on blank or off-image pixels), with covariance
``rms^2 A^-1 B A^-1``, ``B_mn = sum_ij K_mi K_nj rho_ij w_i w_j`` (``B = A`` for white noise).
Clusters are processed in batches of equal membership. A and b are exact pixel sums; for B,
``K_n conv rho`` is taken in closed form (:func:`ese_assets.core.kernels.smoothed_kernel`, exact
for a well-sampled beam) unless blank or off-image pixels fall inside the union of the stamps,
where it is the exact FFT sum over the unblanked pixels.

Members that are not measured (blank or edge) stay in the system as nuisance amplitudes when it
stays well conditioned, so that their flux spilling onto the observed pixels does not bias their
neighbours; their own amplitude is reported as NaN. The system is solved in Jacobi-scaled form
``A_s = D^-1/2 A D^-1/2`` (D = diag A, so the blanking of a member's pixels does not masquerade
as ill-conditioning), and a cluster whose ``cond(A_s)`` exceeds ``MAX_BLEND_CONDITION`` is solved
again without its unmeasured members; if it is still ill-conditioned (members at almost the same
position) all its amplitudes are NaN. For two members whose kernels correlate by r,
``cond(A_s) = (1 + r)/(1 - r)`` and the amplitude errors grow by ``1/sqrt(1 - r^2) ~
sqrt(cond/2)``, so the limit caps that growth at ~70.

Pixel conventions: arrays are indexed ``[y, x]``, pixel coordinates are 0-based.
"""

from __future__ import annotations

import numpy as np

from ese_assets.core.kernels import convolve_with_rho, gaussian, smoothed_kernel

#: Largest condition number of a cluster's Jacobi-scaled normal matrix that is solved (amplitude
#: errors grow by ~sqrt(cond / 2) over an isolated fit, i.e. <= ~70).
MAX_BLEND_CONDITION = 1e4


def _close_pairs(x: np.ndarray, y: np.ndarray, link: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with separation < link, via a hash grid of cell size link: each point is
    compared with the points of its own cell and of 4 of its 8 neighbour cells (each unordered
    cell pair once). Work ~ N x (mean cell occupancy); ragged ranges expanded with np.repeat."""
    n = x.size
    empty = np.empty(0, dtype=np.int64)
    if n < 2:
        return empty, empty
    gx = np.floor((x - x.min()) / link).astype(np.int64)
    gy = np.floor((y - y.min()) / link).astype(np.int64)
    ncx = int(gx.max()) + 3
    key = (gy + 1) * ncx + (gx + 1)
    order = np.argsort(key, kind="stable")
    skey = key[order]
    pi, pj = [], []
    for ddx, ddy in ((0, 0), (1, 0), (-1, 1), (0, 1), (1, 1)):
        target = key + ddy * ncx + ddx
        lo = np.searchsorted(skey, target, side="left")
        hi = np.searchsorted(skey, target, side="right")
        cnt = hi - lo
        i = np.repeat(np.arange(n), cnt)
        start = np.repeat(lo - np.cumsum(cnt) + cnt, cnt)  # ragged arange: lo + 0..cnt-1
        j = order[start + np.arange(i.size)]
        keep = (i < j) if (ddx, ddy) == (0, 0) else np.ones(i.size, dtype=bool)
        keep &= (x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2 < link * link
        pi.append(i[keep])
        pj.append(j[keep])
    return np.concatenate(pi), np.concatenate(pj)


def friends_of_friends(x, y, link_pix: float) -> np.ndarray:
    """Cluster labels (the smallest member index) for friends-of-friends with linking length
    ``link_pix`` on pixel positions; isolated points are their own cluster. Connected components
    by min-label propagation with pointer jumping (iterations ~ log of the cluster diameter)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    labels = np.arange(x.size)
    i, j = _close_pairs(x, y, float(link_pix))
    if i.size == 0:
        return labels
    while True:
        m = np.minimum(labels[i], labels[j])
        new = labels.copy()
        np.minimum.at(new, i, m)
        np.minimum.at(new, j, m)
        new = new[new]
        while True:  # pointer jumping to the root
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


def solve_scaled(a_mat, b_vec, dead):
    """Solve the normal equations ``A a = b`` of a stack of clusters, shapes (c, M, M) and (c, M).

    Rows/columns of ``dead`` members (c, M) are replaced by the identity (amplitude 0, no coupling).
    The system is Jacobi-scaled, ``A_s = D^-1/2 A D^-1/2`` with D = diag A, so that a member with
    few unblanked pixels (small A_mm) is not mistaken for a degenerate one, and solved only where
    ``cond(A_s) < MAX_BLEND_CONDITION``. Returns (solution, A^-1, good); the first two are
    meaningless where good is False.
    """
    m = a_mat.shape[-1]
    eye = np.eye(m, dtype=bool)[None]
    a_mat = np.where(dead[:, :, None] | dead[:, None, :], np.where(eye, 1.0, 0.0), a_mat)
    b_vec = np.where(dead, 0.0, b_vec)
    diag = np.einsum("cmm->cm", a_mat)
    finite = np.all(np.isfinite(a_mat), axis=(1, 2)) & np.all(np.isfinite(b_vec), axis=1)
    scale = np.where(
        finite[:, None] & (diag > 0), 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0
    )
    a_s = np.where(
        finite[:, None, None], scale[:, :, None] * a_mat * scale[:, None, :], np.eye(m)[None]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.linalg.cond(a_s)
    good = finite & np.all(diag > 0, axis=1) & np.isfinite(cond) & (cond < MAX_BLEND_CONDITION)
    a_s_inv = np.linalg.inv(np.where(good[:, None, None], a_s, np.eye(m)[None]))
    a_inv = scale[:, :, None] * a_s_inv * scale[:, None, :]
    sol = np.einsum("cmn,cn->cm", a_inv, np.where(good[:, None], b_vec, 0.0))
    return sol, a_inv, good


def fit_clusters(
    data,
    members,
    unmeasured,
    x,
    y,
    cxi,
    cyi,
    icov,
    bkg,
    rms,
    h,
    icov_centre,
    noise_correlation,
    chunk_pix,
):
    """Joint amplitude fits for clusters of equal size M; ``members`` is (n_clusters, M).
    ``unmeasured`` (per source): blank or edge sources, fitted as nuisance amplitudes only.
    Returns (amp, err) of shape (n_clusters, M); NaN for unmeasured members and for
    ill-conditioned systems (see :func:`solve_scaled`)."""
    ny, nx = data.shape
    nclu, m = members.shape
    amp = np.full((nclu, m), np.nan)
    err = np.full((nclu, m), np.nan)
    span_x = cxi[members].max(axis=1) - cxi[members].min(axis=1)
    span_y = cyi[members].max(axis=1) - cyi[members].min(axis=1)
    # Chunk so that (clusters x members x region pixels) stays bounded.
    order = np.argsort(span_x + span_y, kind="stable")
    start = 0
    while start < nclu:
        # Sorted by span, so the last cluster of a chunk has the largest region: size the chunk
        # from the first cluster, then shrink it to fit the last one.
        nchunk = nclu
        for probe in (order[start], order[min(start + nchunk, nclu) - 1]):
            pix = m * (int(span_x[probe]) + 2 * h + 1) * (int(span_y[probe]) + 2 * h + 1)
            nchunk = max(1, min(nchunk, chunk_pix // pix))
        sel = order[start : start + nchunk]
        start += nchunk
        mem = members[sel]  # (c, M)
        rx = int(span_x[sel].max()) + 2 * h + 1
        ry = int(span_y[sel].max()) + 2 * h + 1
        ox = cxi[mem].min(axis=1) - h
        oy = cyi[mem].min(axis=1) - h
        rows = oy[:, None] + np.arange(ry)[None, :]  # (c, Ry)
        cols = ox[:, None] + np.arange(rx)[None, :]  # (c, Rx)
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        region = data[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
        # Fit pixels: inside the image, finite, and within some member's stamp (the union of the
        # stamps; the rest of the bounding box may hold unrelated sources).
        in_stamp = (np.abs(rows[:, None, :] - cyi[mem][:, :, None]) <= h)[:, :, :, None] & (
            np.abs(cols[:, None, :] - cxi[mem][:, :, None]) <= h
        )[:, :, None, :]  # (c, M, Ry, Rx)
        in_union = in_stamp.any(axis=1)
        w = inside & np.isfinite(region) & in_union
        d = np.where(w, region - bkg[mem].mean(axis=1)[:, None, None], 0.0)
        dx = cols[:, None, None, :] - x[mem][:, :, None, None]
        dy = rows[:, None, :, None] - y[mem][:, :, None, None]
        k = gaussian(icov[mem][:, :, None, None, :, :], dx, dy)  # (c, M, Ry, Rx)
        kw = k * w[:, None, :, :]
        a_mat = np.einsum("cmyx,cnyx->cmn", kw, k)
        b_vec = np.einsum("cmyx,cyx->cm", kw, d)
        # Members with (almost) no pixels in the fit (e.g. far off the image edge) are dropped
        # from the system so that it stays regular; their amplitude stays NaN. Unmeasured members
        # (blank or edge) stay as nuisance amplitudes unless that makes the system ill-conditioned.
        diag = np.einsum("cmm->cm", a_mat)
        dead = ~(diag > 1e-6 * diag.max(axis=1, keepdims=True))
        sol, a_inv, good = solve_scaled(a_mat, b_vec, dead)
        retry = ~good & (unmeasured[mem] & ~dead).any(axis=1)
        if retry.any():
            dead[retry] |= unmeasured[mem[retry]]
            sol[retry], a_inv[retry], good[retry] = solve_scaled(
                a_mat[retry], b_vec[retry], dead[retry]
            )
        if not good.any():
            continue
        if noise_correlation == "none":
            cov = a_inv
        else:
            # B_mn = sum_i Kw_m(i) (K_n conv rho)(i), with K_n conv rho in closed form (continuous
            # Gaussian convolution) instead of one FFT per member and cluster.
            g_live = smoothed_kernel(icov[mem], icov_centre, dx, dy)
            kw_live = kw
            if dead.any():  # (rare) zero the dead members, in place for g: no extra copies
                kw_live = np.where(dead[:, :, None, None], 0.0, kw)
                g_live[dead] = 0.0
            b_mat = np.einsum("cmyx,cnyx->cmn", kw_live, g_live)
            # The closed form convolves the whole kernel K_n, but only Kw_n (its unblanked pixels)
            # enters the estimator: where blank or off-image pixels fall inside the union of the
            # stamps, B = sum Kw_m (Kw_n conv rho) exactly (FFT), else A^-1 B A^-1 is not even
            # positive for members with few unblanked pixels.
            holes = (in_union & ~w).any(axis=(1, 2))
            if holes.any():
                kh = kw_live[holes]
                b_mat[holes] = np.einsum("cmyx,cnyx->cmn", kh, convolve_with_rho(kh, icov_centre))
            b_mat = 0.5 * (b_mat + np.swapaxes(b_mat, 1, 2))
            cov = a_inv @ b_mat @ a_inv
        var = np.einsum("cmm->cm", cov)
        with np.errstate(invalid="ignore"):
            e = rms[mem] * np.sqrt(var)
        ok = good[:, None] & ~dead & ~unmeasured[mem] & (var > 0)
        amp[sel] = np.where(ok, sol, np.nan)
        err[sel] = np.where(ok, e, np.nan)
    return amp, err

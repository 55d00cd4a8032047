"""Cone searches on the source positions of ``variability_stats`` (relative lightcurves).

The SQL selects a box around the cone (bound parameters; :func:`ese_assets.core.relative.cone_box`
gives it, two RA ranges across RA 0); the exact separation is computed in numpy afterwards, so a
box corner never counts as inside.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import sqlalchemy as sa

from ese_assets.core.relative import angular_separation_deg, cone_box
from ese_assets.storage.access import Bind, read_frame, reading
from ese_assets.storage.schema import variability_stats as stats_table

#: Columns of :func:`sources_in_cone`, in order.
CONE_COLUMNS = ("source_id", "ra_deg", "dec_deg", "eta_metric", "n_obs", "sep_deg")


def sources_in_cone(bind: Bind, ra_deg: float, dec_deg: float, radius_deg: float) -> pd.DataFrame:
    """Sources of ``variability_stats`` within ``radius_deg`` of (ra, dec), nearest first.

    Columns :data:`CONE_COLUMNS` (``sep_deg`` the great-circle separation). ``SELECT ... WHERE
    dec_deg BETWEEN :lo AND :hi AND (ra_deg BETWEEN :a AND :b [OR ...])``, then the exact cut.
    """
    dec_min, dec_max, ra_ranges = cone_box(float(ra_deg), float(dec_deg), float(radius_deg))
    stmt: sa.Select[Any] = sa.select(
        stats_table.c.source_id,
        stats_table.c.ra_deg,
        stats_table.c.dec_deg,
        stats_table.c.eta_metric,
        stats_table.c.n_obs,
    ).where(
        stats_table.c.dec_deg.between(dec_min, dec_max),
        sa.or_(*(stats_table.c.ra_deg.between(lo, hi) for lo, hi in ra_ranges)),
    )
    with reading(bind) as conn:
        frame = read_frame(conn, stmt.order_by(stats_table.c.source_id))
    frame["sep_deg"] = angular_separation_deg(
        float(ra_deg),
        float(dec_deg),
        frame["ra_deg"].to_numpy(float),
        frame["dec_deg"].to_numpy(float),
    )
    frame = frame[frame["sep_deg"] <= float(radius_deg)]
    return frame.sort_values(["sep_deg", "source_id"], kind="mergesort").reset_index(drop=True)[
        list(CONE_COLUMNS)
    ]

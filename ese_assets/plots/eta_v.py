"""The η–V diagram of the source population (VAST/TraP style), candidates highlighted."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ese_assets.plots.figures import GID_CANDIDATES, GID_POPULATION, FigureConfig, new_figure


def eta_v_figure(
    stats: pd.DataFrame,
    highlight_ids: Iterable[str] = (),
    *,
    config: FigureConfig | None = None,
    label_highlighted: int = 15,
) -> Figure:
    """The η–V diagram: log10 ``eta_metric`` (x) against log10 ``v_index`` (y) of every source in
    ``stats`` (``variability_stats`` rows), the ``highlight_ids`` (open candidates) marked and,
    up to ``label_highlighted`` of them, named. Sources without positive η and V cannot be placed
    on log axes; their number is stated in the title."""
    highlight = {str(s) for s in highlight_ids}
    ids = stats["source_id"].astype(str).to_numpy()
    eta = stats["eta_metric"].to_numpy(dtype=float)
    v = stats["v_index"].to_numpy(dtype=float)
    placed = np.isfinite(eta) & np.isfinite(v) & (eta > 0) & (v > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = np.log10(eta), np.log10(v)
    marked = placed & np.isin(ids, list(highlight))
    config = config or FigureConfig()
    _, _, _, legend = config.resolved()
    with mpl.rc_context(config.rc_params()):
        fig = new_figure(config)
        ax = fig.add_subplot()
        ax.plot(
            x[placed & ~marked],
            y[placed & ~marked],
            ".",
            color="0.45",
            ms=4,
            label=f"sources ({(placed & ~marked).sum()})",
            gid=GID_POPULATION,
        )
        ax.plot(
            x[marked],
            y[marked],
            "*",
            color="C3",
            ms=11,
            mec="k",
            mew=0.5,
            label=f"open candidates ({marked.sum()})",
            gid=GID_CANDIDATES,
            zorder=3,
        )
        if marked.sum() <= label_highlighted:
            for sid, xi, yi in zip(ids[marked], x[marked], y[marked], strict=True):
                ax.annotate(
                    sid, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="x-small"
                )
        ax.set_xlabel("log₁₀ η (eta_metric)")
        ax.set_ylabel("log₁₀ V (v_index)")
        title = f"η–V diagram: {placed.sum()} sources"
        if (~placed).any():
            title += f" ({(~placed).sum()} without positive η and V not shown)"
        missing = sorted(highlight - set(ids[marked]))
        if missing:
            title += f"\n{len(missing)} open candidate(s) not placed: {', '.join(missing[:5])}"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(loc="best", framealpha=0.8)
    return fig

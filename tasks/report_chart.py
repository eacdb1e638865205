"""The report's forest plot: per category the candidate's and the baseline's rate with 95%
intervals against max_rate, and the paired delta with its interval against max_regression.
Drawn with matplotlib (Agg) as inline SVG, text kept as text: the page stays self-contained."""

from __future__ import annotations

import io
from typing import Any

import polars as pl

_BLUE, _GREY, _RED = "#2f6feb", "#8c959f", "#b91c1c"


def forest_plot(gated: pl.DataFrame, base: dict[str, dict[str, Any]]) -> str:
    """SVG markup of the two-panel forest plot (rates | deltas), one row per category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = gated.to_dicts()
    n = len(rows)
    ys = list(range(n))[::-1]
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "depsim"}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.38 * n + 1.3), sharey=True,
                                          gridspec_kw={"width_ratios": [3, 2], "wspace": 0.05})
        for y, r in zip(ys, rows, strict=True):
            b = base.get(r["category"])
            if b and b["rate"] is not None:
                left.errorbar(b["rate"], y - 0.18, xerr=[[b["rate"] - b["lower"]], [b["upper"] - b["rate"]]],
                              fmt="D", ms=4, color=_GREY, capsize=2, lw=1)
            if r["rate"] is not None and r["rate"] == r["rate"]:
                left.errorbar(r["rate"], y + 0.12, xerr=[[r["rate"] - r["lower"]], [r["upper"] - r["rate"]]],
                              fmt="o", ms=5, color=_BLUE, capsize=2, lw=1.4)
            if r.get("max_rate") is not None:
                left.plot([r["max_rate"]] * 2, [y - 0.42, y + 0.42], color=_RED, lw=1, ls="--")
            if r.get("delta") is not None:
                right.errorbar(r["delta"], y, xerr=[[r["delta"] - r["delta_lower"]], [r["delta_upper"] - r["delta"]]],
                               fmt="s", ms=4, color=_BLUE, capsize=2, lw=1.4)
            if r.get("max_regression") is not None:
                right.plot([r["max_regression"]] * 2, [y - 0.42, y + 0.42], color=_RED, lw=1, ls="--")
        right.axvline(0, color="#57606a", lw=0.8)
        pct = FuncFormatter(lambda v, _pos: f"{100 * v:.3g}%")
        for ax, title in ((left, "rate per turn: ● candidate  ◆ baseline  ┆ max_rate"),
                          (right, "delta (candidate − baseline)  ┆ max_regression")):
            ax.xaxis.set_major_formatter(pct)
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.set_title(title, fontsize=9, loc="left")
            ax.grid(axis="x", color="#eaeef2", lw=0.6)
            ax.spines[["top", "right"]].set_visible(False)
        left.set_xlim(left=0)
        left.set_yticks(ys, [r["category"] for r in rows])
        left.set_ylim(-0.7, n - 0.3)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # inline: no XML prolog or DOCTYPE inside HTML

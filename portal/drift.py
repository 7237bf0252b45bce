"""Drift on the models page: :mod:`core.monitoring`'s daily numbers as small inline SVG plots and a table.

The plots are drawn server-side (coordinates here, markup in ``_model_drift.html``): no script, no
external assets, nothing the Content-Security-Policy has to allow. Colours come from ``style.css``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from core.models import ModelVersion
from core.monitoring import DistributionDrift, VersionDrift, version_drift

#: Size of one plot (SVG user units = CSS pixels) and its margins.
WIDTH, HEIGHT = 360, 150
LEFT, RIGHT, TOP, BOTTOM = 36, 8, 10, 30
#: Most recent days with predictions drawn over the validation bars.
RECENT_DAYS = 7
#: At most this many edge labels under the x axis.
MAX_TICKS = 6


def _number(value: float) -> str:
    """A bin edge, short: 0.95, 12, 1,000."""
    if abs(value) >= 1000 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.3g}"


def distribution_chart(distribution: DistributionDrift, recent: int = RECENT_DAYS) -> dict[str, Any]:
    """Geometry of one plot: validation shares as bars, each recent day's shares as a line.

    Bins get equal widths whatever their edges (unfamiliar-score edges are often log-spaced); the
    edges are written under the axis. The latest day is drawn darker, drifted days in red.
    """
    bins = len(distribution.edges) - 1
    days = distribution.days[-recent:]
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = max([*distribution.validation_shares, *(share for day in days for share in day.shares)], default=0.0) or 1.0
    slot = plot_width / bins
    baseline = TOP + plot_height

    def y(share: float) -> float:
        return round(TOP + plot_height * (1.0 - share / peak), 1)

    edges = distribution.edges
    bars = [
        {"x": round(LEFT + index * slot + 1, 1), "y": y(share), "width": round(max(slot - 2, 1.0), 1),
         "height": round(baseline - y(share), 1),
         "title": f"validation, {_number(edges[index])} to {_number(edges[index + 1])}: {share:.1%}"}
        for index, share in enumerate(distribution.validation_shares)
    ]
    lines = []
    for position, day in enumerate(days):
        kind = "drifted" if day.drifted else ("latest" if position == len(days) - 1 else "recent")
        if not day.enough:
            kind += " few"
        lines.append({
            "points": " ".join(f"{round(LEFT + (index + 0.5) * slot, 1)},{y(share)}" for index, share in enumerate(day.shares)),
            "kind": kind,
            "title": f"{day.day}: {day.n} predictions, PSI {day.psi:.2f}" + ("" if day.enough else " (too few to judge)"),
        })
    step = max(1, math.ceil(bins / (MAX_TICKS - 1)))
    tick_indices = sorted({*range(0, bins + 1, step), bins})
    ticks = [{"x": round(LEFT + index * slot, 1), "label": _number(edges[index])} for index in tick_indices]
    return {
        "name": distribution.name,
        "words": distribution.words,
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "baseline": baseline,
        "peak": f"{peak:.0%}",
        "bars": bars, "lines": lines, "ticks": ticks,
        "days_drawn": len(days),
        "label": f"{distribution.words} distribution: validation (bars) against the last {len(days)} days with predictions (lines)",
    }


def drift_table(drift: VersionDrift) -> dict[str, Any]:
    """Per-day PSI of every distribution, newest day first: ``{"columns": [...], "rows": [...]}``."""
    by_day: dict[str, dict[str, Any]] = {}
    for distribution in drift.distributions:
        for day in distribution.days:
            by_day.setdefault(day.day, {})[distribution.name] = day
    rows = [
        {"day": day, "cells": [by_day[day].get(d.name) for d in drift.distributions]}
        for day in sorted(by_day, reverse=True)
    ]
    return {"columns": [d.words for d in drift.distributions], "rows": rows}


def drift_views(session: Session, versions: Iterable[ModelVersion], psi_threshold: float) -> dict[int, dict[str, Any]]:
    """For each version with a validation reference: its warnings, plots and per-day table (others left out)."""
    views = {}
    for version in versions:
        drift = version_drift(session, version, psi_threshold)
        if drift is None:
            continue
        first = drift.distributions[0]
        views[version.id] = {
            "warnings": drift.warnings,
            "charts": [distribution_chart(d) for d in drift.distributions],
            "table": drift_table(drift),
            "days": drift.days,
            "threshold": psi_threshold,
            "min_predictions": first.min_predictions,
        }
    return views

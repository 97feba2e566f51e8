"""Small inline SVG charts for the console, drawn from numbers the API returned (nothing is
computed here but positions). Colours are presentation attributes, not `style`, so the console's
Content-Security-Policy holds; each chart is an `<svg role="img">` with a title, and the numbers
are also in a table beside it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta
from html import escape

from markupsafe import Markup

from lorafleet.serve.types import epoch

__all__ = [
    "colour",
    "interval_bars",
    "comparison_bars",
    "difference_bars",
    "time_lines",
    "weights_bar",
    "rollout_charts",
    "day_bars",
    "usage_charts",
]

_PALETTE = ("#1f6fb2", "#d9661f", "#2e8b57", "#8e44ad", "#b8860b", "#c0392b", "#16a085", "#555555")
_AXIS, _GRID, _TEXT = "#6b6b6b", "#e3e3e3", "#1c1c1c"


def colour(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _number(value: float) -> str:
    return f"{value:.3g}"


def interval_bars(
    title: str,
    rows: Sequence[tuple[str, float | None, Sequence[float] | None]],
    fmt: Callable[[float], str] = _number,
    width: int = 420,
) -> Markup:
    """One horizontal bar per variant (its value), with the interval as a whisker where the API
    gave one."""
    known = [v for _, v, _ in rows if v is not None] + [x for *_, i in rows if i for x in i]
    if not known:
        return Markup(f'<p class="empty">{escape(title)}: nothing measured yet.</p>')
    low, high = min(0.0, *known), max(0.0, *known)
    high = high if high > low else low + 1.0
    label_w, bar_h, gap, top = 90, 18, 8, 24
    plot_w = width - label_w - 70
    height = top + len(rows) * (bar_h + gap) + 4

    def x(value: float) -> float:
        return label_w + (value - low) / (high - low) * plot_w

    parts = [
        f'<text x="0" y="14" font-size="13" fill="{_TEXT}" font-weight="600">'
        f"{escape(title)}</text>",
        f'<line x1="{x(0):.1f}" y1="{top - 4}" x2="{x(0):.1f}" y2="{height}" stroke="{_AXIS}"/>',
    ]
    for i, (label, value, interval) in enumerate(rows):
        y = top + i * (bar_h + gap)
        parts.append(
            f'<text x="0" y="{y + 13}" font-size="12" fill="{_TEXT}">{escape(label)}</text>'
        )
        if value is None:
            parts.append(
                f'<text x="{label_w}" y="{y + 13}" font-size="12" fill="{_AXIS}">no data</text>'
            )
            continue
        x0, x1 = sorted((x(0), x(value)))
        parts.append(
            f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="{bar_h}" '
            f'fill="{colour(i)}" opacity="0.85"><title>{escape(label)}: '
            f"{escape(fmt(value))}</title></rect>"
        )
        if interval:
            a, b = x(interval[0]), x(interval[1])
            mid = y + bar_h / 2
            parts.append(
                f'<path d="M{a:.1f} {mid - 5}v10M{a:.1f} {mid}H{b:.1f}M{b:.1f} {mid - 5}v10" '
                f'stroke="{_TEXT}" fill="none" stroke-width="1.5"/>'
            )
        parts.append(
            f'<text x="{max(x1, x(interval[1]) if interval else x1) + 6:.1f}" y="{y + 13}" '
            f'font-size="12" fill="{_TEXT}">{escape(fmt(value))}</text>'
        )
    return _svg(title, width, height, parts)


# an A/B comparison's rate differences (`GET /v1/deployments/{d}/ab`): (field, label)
COMPARED_RATES = (
    ("error_rate", "error rate"),
    ("format_validity", "format validity"),
    ("feedback", "feedback"),
)


def comparison_bars(comparison: dict) -> Markup:
    """One A/B variant's differences from the control, on rates, with their intervals."""
    rows = [
        (label, comparison[key]["diff"], comparison[key]["interval"])
        for key, label in COMPARED_RATES
        if comparison.get(key)
    ]
    return interval_bars(f"{comparison['variant']} − {comparison['against']}", rows)


def difference_bars(title: str, differences: Sequence[dict]) -> Markup:
    """Paired differences (`effect`, `interval`) of each variant from the one it was compared
    against."""
    return interval_bars(
        title,
        [
            (f"{d['variant']} − {d['against']}", d.get("effect"), d.get("interval"))
            for d in differences
        ],
    )


def time_lines(
    title: str,
    series: dict[str, list[tuple[float, float | None]]],
    fmt: Callable[[float], str] = _number,
    marks: Sequence[tuple[float, str]] = (),
    width: int = 420,
    height: int = 170,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """One line per variant over time (epoch seconds), gaps where a value is None; `marks` are
    labelled vertical lines (decisions, alarms)."""
    points = [(t, v) for values in series.values() for t, v in values if v is not None]
    if not points:
        return Markup(f'<p class="empty">{escape(title)}: nothing measured yet.</p>')
    t_low = min([t for t, _ in points] + [t for t, _ in marks])
    t_high = max([t for t, _ in points] + [t for t, _ in marks])
    t_high = t_high if t_high > t_low else t_low + 1.0
    v_low, v_high = y_range or (min(0.0, *(v for _, v in points)), max(v for _, v in points))
    v_high = v_high if v_high > v_low else v_low + 1.0
    left, right, top, bottom = 52, 10, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + (t - t_low) / (t_high - t_low) * plot_w

    def y(v: float) -> float:
        return top + (1 - (v - v_low) / (v_high - v_low)) * plot_h

    parts = [
        f'<text x="0" y="14" font-size="13" fill="{_TEXT}" font-weight="600">{escape(title)}</text>'
    ]
    for v in (v_low, (v_low + v_high) / 2, v_high):
        parts.append(
            f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" '
            f'stroke="{_GRID}"/>'
            f'<text x="{left - 4}" y="{y(v) + 4:.1f}" font-size="10" fill="{_AXIS}" '
            f'text-anchor="end">{escape(fmt(v))}</text>'
        )
    for t in (t_low, t_high):
        anchor = "start" if t == t_low else "end"
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - 18}" font-size="10" fill="{_AXIS}" '
            f'text-anchor="{anchor}">'
            f"{time.strftime('%H:%M:%S', time.gmtime(t))} UTC</text>"
        )
    for t, label in marks:
        parts.append(
            f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{top + plot_h}" '
            f'stroke="#c0392b" stroke-dasharray="3 3"><title>{escape(label)}</title></line>'
        )
    for i, (name, values) in enumerate(series.items()):
        path, pen_down = [], False
        for t, value in values:
            if value is None or math.isnan(value):
                pen_down = False
                continue
            v = value
            path.append(f"{'L' if pen_down else 'M'}{x(t):.1f} {y(v):.1f}")
            pen_down = True
        parts.append(
            f'<path d="{" ".join(path)}" stroke="{colour(i)}" stroke-width="2" fill="none"/>'
        )
        parts.extend(
            f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour(i)}">'
            f"<title>{escape(name)}: {escape(fmt(v))}</title></circle>"
            for t, v in values
            if v is not None
        )
        parts.append(
            f'<rect x="{left + i * 90}" y="{height - 10}" width="10" height="10" '
            f'fill="{colour(i)}"/>'
            f'<text x="{left + i * 90 + 14}" y="{height - 1}" font-size="11" fill="{_TEXT}">'
            f"{escape(name)}</text>"
        )
    return _svg(title, width, height, parts)


def day_bars(
    title: str,
    days: Sequence[str],
    series: Mapping[str, Sequence[float]],
    fmt: Callable[[float], str] = _number,
    empty: str = "nothing used in this range",
    width: int = 560,
    height: int = 190,
) -> Markup:
    """One stacked bar per day (`days`, in order), a segment per series (its value that day);
    `empty` where every value is 0."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    if not days or not any(totals):
        return Markup(f'<p class="empty">{escape(title)}: {escape(empty)}.</p>')
    high = _round_up(max(totals))
    left, right, top, bottom = 60, 10, 22, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(days)
    bar_w = max(2.0, min(28.0, slot * 0.7))
    parts = [
        f'<text x="0" y="14" font-size="13" fill="{_TEXT}" font-weight="600">{escape(title)}</text>'
    ]
    for v in (0.0, high / 2, high):
        y = top + (1 - v / high) * plot_h
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{_GRID}"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" fill="{_AXIS}" '
            f'text-anchor="end">{escape(fmt(v))}</text>'
        )
    for i, day in enumerate(days):
        x, base = left + i * slot + (slot - bar_w) / 2, float(top + plot_h)
        for j, (name, values) in enumerate(series.items()):
            h = values[i] / high * plot_h
            if h <= 0:
                continue
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour(j)}"><title>{escape(day)} {escape(name)}: '
                f"{escape(fmt(values[i]))}</title></rect>"
            )
    for i in sorted({0, len(days) - 1}):
        anchor = "start" if i == 0 and len(days) > 1 else "end" if i else "middle"
        x = left + i * slot + (0 if anchor == "start" else slot if anchor == "end" else slot / 2)
        parts.append(
            f'<text x="{x:.1f}" y="{height - 22}" font-size="10" fill="{_AXIS}" '
            f'text-anchor="{anchor}">{escape(days[i])}</text>'
        )
    for j, name in enumerate(series):
        parts.append(
            f'<rect x="{left + j * 130}" y="{height - 10}" width="10" height="10" '
            f'fill="{colour(j)}"/>'
            f'<text x="{left + j * 130 + 14}" y="{height - 1}" font-size="11" fill="{_TEXT}">'
            f"{escape(name)}</text>"
        )
    return _svg(title, width, height, parts)


def _round_up(value: float) -> float:
    """The axis' top: the next of 1, 2, 2.5, 5 times a power of ten (its half a round tick too)."""
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value * (1 - 1e-9))


def usage_charts(report: dict) -> list[Markup]:
    """Tokens and cost per day from a usage report grouped by day (live and batch rows of a day
    added up): every day of its range, those without usage at 0."""
    first, last = date.fromisoformat(report["start"]), date.fromisoformat(report["end"])
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    rows, currency = report["rows"], report["currency"]
    by_day: dict[str, dict[str, float]] = {day: {} for day in days}
    for row in rows:
        sums = by_day[row["day"]]
        for name in ("prompt_tokens", "completion_tokens", "cost"):
            sums[name] = sums.get(name, 0.0) + row[name]
    tokens = {
        "prompt tokens": [by_day[d].get("prompt_tokens", 0.0) for d in days],
        "completion tokens": [by_day[d].get("completion_tokens", 0.0) for d in days],
    }
    cost = {f"cost ({currency})": [by_day[d].get("cost", 0.0) for d in days]}
    return [
        day_bars("tokens per day", days, tokens, lambda v: f"{v:,.0f}"),
        day_bars(
            f"cost per day ({currency})",
            days,
            cost,
            lambda v: f"{v:.4g}",
            "no cost in this range (its prices are 0)",
        ),
    ]


def _svg(title: str, width: int, height: int, parts: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="system-ui, sans-serif"><title>{escape(title)}</title>{"".join(parts)}</svg>'
    )


def weights_bar(variants: Sequence[dict], width: int = 360, height: int = 26) -> Markup:
    """The traffic split: one segment per variant, as wide as its weight (percent)."""
    total = sum(float(v["weight"]) for v in variants) or 1.0
    x, parts = 0.0, []
    for i, v in enumerate(variants):
        w = float(v["weight"]) / total * width
        label = f"{v['label']} {float(v['weight']):g} %"
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour(i)}">'
            f"<title>{escape(label)}</title></rect>"
        )
        if w > 7 * len(label) + 10:  # room for the label (about 7 px a character at 12 px)
            parts.append(
                f'<text x="{x + 6:.1f}" y="{height / 2 + 4:.1f}" font-size="12" fill="#fff">'
                f"{escape(label)}</text>"
            )
        x += w
    summary = ", ".join(f"{v['label']} {float(v['weight']):g} %" for v in variants)
    return _svg(f"traffic split: {summary}", width, height, parts)


# what a rollout's live charts plot, from `GET /v1/deployments/{d}/rollout/series`: (title, bucket
# field, format)
ROLLOUT_SERIES = (
    ("requests per period", "requests", lambda v: f"{v:.0f}"),
    ("error rate", "error_rate", lambda v: f"{100 * v:.1f} %"),
    ("mean latency", "latency_ms_mean", lambda v: f"{v:.0f} ms"),
    ("format validity", "format_validity", lambda v: f"{100 * v:.0f} %"),
    ("mean feedback (0–1)", "feedback_mean", lambda v: f"{v:.2f}"),
)


def _seconds(at: str) -> float:
    """An API time (RFC 3339) as the charts' x: seconds since the epoch."""
    return epoch(at) or 0.0


def rollout_charts(series: dict, decisions: Sequence[dict]) -> list[Markup]:
    """One chart per measure, a line per variant, the rollout's decisions marked; feedback only
    where present."""
    marks = [(_seconds(d["at"]), f"{d['action']}: {d['reason']}") for d in decisions]
    bounded = {"error_rate": (0.0, 1.0), "format_validity": (0.0, 1.0), "feedback_mean": (0.0, 1.0)}
    out = []
    for title, field, fmt in ROLLOUT_SERIES:
        lines = {
            v["variant"]: [(_seconds(b["start"]), b.get(field)) for b in v["buckets"]]
            for v in series["variants"]
        }
        if field == "feedback_mean" and not any(
            value is not None for points in lines.values() for _, value in points
        ):
            continue
        out.append(
            time_lines(
                f"{title} (periods of {series['bucket_s']} s)",
                lines,
                fmt,
                marks,
                y_range=bounded.get(field),
            )
        )
    return out

"""`lorafleet drift report`: one self-contained HTML file with plots of a deployment's drift
history."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import defaultdict

from lorafleet.serve.types import epoch

__all__ = ["render_report", "figures"]


def _when(at: dt.datetime | str | float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch(at))  # type: ignore[arg-type]  # never None here


def _png(figure) -> str:
    """The figure as base64 PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _grouped(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


def _finish(plt, figure, axes, legend_size: int) -> str:
    for axis in axes:
        axis.legend(fontsize=legend_size)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    image = _png(figure)
    plt.close(figure)
    return image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# what a chart over time says instead of plotting a single point (whose axis would span years)
NOT_ENOUGH = "not enough looks yet: one so far; the chart starts with the second"
FIGSIZE = (10, 3.2)  # inches at 110 dpi: 1100 pixels, within a 1280-pixel window beside the margins


def _over_time(rows: list[dict]) -> bool:
    """Whether rows span at least two instants (a line over time needs two)."""
    return len({r["at"] for r in rows}) >= 2


def _plots(history: dict) -> list[tuple[str, str | None]]:
    plt = _pyplot()
    plots: list[tuple[str, str | None]] = []
    runs = history["runs"]
    if runs and not _over_time(runs):
        plots.append(("Validation replay", None))
    elif runs:
        figure, (score, exact) = plt.subplots(1, 2, figsize=FIGSIZE)
        for version, rs in _grouped(runs, "version").items():
            times = [_when(r["at"]) for r in rs]
            score.plot(times, [r["score"] for r in rs], marker="o", label=version)
            exact.plot(times, [r["exact_match_rate"] for r in rs], marker="o", label=version)
            changed = [r for r in rs if r["changed"]]
            exact.scatter(
                [_when(r["at"]) for r in changed],
                [r["exact_match_rate"] for r in changed],
                color="red",
                zorder=3,
                s=60,
                label=f"{version}: changed",
            )
        score.set(title="validation score", ylim=(-0.02, 1.02))
        exact.set(title="answers equal to the baseline", ylim=(-0.02, 1.02))
        plots.append(("Validation replay", _finish(plt, figure, (score, exact), 8)))
    checks = history["checks"]
    for kind, title in (
        ("input", "Input drift (live requests vs the validation set)"),
        ("output", "Output drift (live answers vs the baseline replay)"),
        (
            "confidence",
            "Output confidence (live answers' mean token log-probability vs the baseline replay)",
        ),
    ):
        rows = [c for c in checks if c["kind"] == kind]
        if not rows:
            continue
        if not _over_time(rows):
            plots.append((title, None))
            continue
        figure, (pvalue, detail) = plt.subplots(1, 2, figsize=FIGSIZE)
        for variant, cs in _grouped(rows, "variant").items():
            times = [_when(c["at"]) for c in cs]
            pvalue.semilogy(
                times, [max(c["p"], 1e-300) for c in cs], marker="o", label=f"{variant} p"
            )
            alarms = [c for c in cs if c["drifted"]]
            pvalue.scatter(
                [_when(c["at"]) for c in alarms],
                [max(c["p"], 1e-300) for c in alarms],
                color="red",
                zorder=3,
                s=60,
                label=f"{variant} alarm",
            )
            _detail(detail, kind, variant, cs)
        pvalue.set(title="look p-value (red: alarm after spending and BH)")
        plots.append((title, _finish(plt, figure, (pvalue, detail), 7)))
    return plots


def _detail(axis, kind: str, variant: str, checks: list[dict]) -> None:
    """The right-hand plot of a kind of look: what moved, live against the reference."""
    times = [_when(c["at"]) for c in checks]
    if kind == "input":
        for name in sorted({k for c in checks for k in c["numbers"].get("p_values", {})}):
            axis.semilogy(
                times,
                [max(c["numbers"]["p_values"].get(name, 1.0), 1e-300) for c in checks],
                label=name,
                alpha=0.8,
            )
        axis.set(title="p-value per test")
        return
    live, reference, label, title = {
        "output": (
            "output_tokens_mean",
            "baseline_output_tokens_mean",
            "mean tokens",
            "answer length (tokens)",
        ),
        "confidence": (
            "confidence_mean",
            "baseline_confidence_mean",
            "mean log-prob",
            "mean token log-probability",
        ),
    }[kind]
    [line] = axis.plot(
        times, [c["numbers"][live] for c in checks], marker="o", label=f"{variant} {label}"
    )
    baseline = [(t, c["numbers"].get(reference)) for t, c in zip(times, checks, strict=True)]
    baseline = [(t, value) for t, value in baseline if value is not None]
    if baseline:  # the legend lists only what is drawn
        axis.plot(
            [t for t, _ in baseline],
            [value for _, value in baseline],
            linestyle="--",
            marker="." if len(baseline) == 1 else None,
            color=line.get_color(),
            label=f"{variant} baseline",
        )
    alarms = [c for c in checks if c["drifted"]]
    axis.scatter(
        [_when(c["at"]) for c in alarms],
        [c["numbers"][live] for c in alarms],
        color="red",
        zorder=3,
        s=60,
        label=f"{variant} alarm",
    )
    axis.set(title=title)


def _feedback_plot(timelines: list[dict]) -> str | None:
    """Feedback rate and mean value per period of each live version; None when no version got any
    feedback."""
    if not any(p["feedback"] for t in timelines for p in t["periods"]):
        return None
    plt = _pyplot()
    figure, (rate, mean) = plt.subplots(1, 2, figsize=FIGSIZE)
    nan = float("nan")  # a period without requests (rate) or without feedback (mean) is a gap
    for t in timelines:
        starts, label = (
            [_when(p["start"]) for p in t["periods"]],
            f"{t['variant']} ({t['version']})",
        )
        rate.plot(
            starts,
            [nan if p["rate"] is None else p["rate"] for p in t["periods"]],
            marker=".",
            label=label,
        )
        mean.plot(
            starts,
            [nan if p["mean"] is None else p["mean"] for p in t["periods"]],
            marker="o",
            label=label,
        )
    rate.set(
        title=f"feedback per answered request (periods of {timelines[0]['bucket_s'] // 60} min)"
    )
    mean.set(title="mean feedback (0: thumbs down, 1: up)", ylim=(-0.02, 1.02))
    return _finish(plt, figure, (rate, mean), 7)


def figures(history: dict, status: dict) -> list[tuple[str, str | None]]:
    """The report's plots as (title, base64 PNG), from the API's drift history and status (the
    console shows the same ones); None for a chart with a single look so far (`NOT_ENOUGH`)."""
    plots = _plots(history)
    feedback = _feedback_plot(status.get("feedback", []))
    if feedback is not None:
        plots.append(("Users' feedback per live version", feedback))
    return plots


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(history: dict, status: dict) -> str:
    """The HTML page: current status, plots over time, and the latest events with their messages."""
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [
        f"<h1>Drift report: {html.escape(history['deployment'])}</h1>",
        f"<p>Generated {now}. Live-request sampling: "
        f"{'on' if status['sample_inputs'] else 'off (opted out)'}; {status['samples']} sampled "
        f"requests kept; validation set {status['validation_set'] or 'none'}.</p>",
    ]
    for title, png in figures(history, status):
        sections.append(
            f"<h2>{html.escape(title)}</h2><p>{NOT_ENOUGH}</p>"
            if png is None
            else f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{png}">'
        )
    if not history["runs"] and not history["checks"]:
        sections.append(
            "<p>Nothing measured yet: run <code>lorafleet drift check</code>, "
            "or wait for traffic.</p>"
        )
    runs = [
        [
            _when(r["at"]).strftime("%m-%d %H:%M"),
            r["variant"],
            r["version"],
            r["kind"],
            f"{r['score']:.3f}",
            f"{r['exact_match_rate']:.3f}",
            r["message"],
        ]
        for r in history["runs"][-20:]
    ]
    if runs:
        sections.append(
            "<h2>Validation replays</h2>"
            + _table(
                runs,
                ["time", "variant", "version", "kind", "score", "equal to baseline", "message"],
            )
        )
    checks = [
        [
            _when(c["at"]).strftime("%m-%d %H:%M"),
            c["kind"],
            c["variant"],
            str(c["look"]),
            f"{c['p']:.2g}",
            f"{c['q']:.2g}",
            "ALARM" if c["drifted"] else "",
            c["message"],
        ]
        for c in history["checks"][-30:]
    ]
    if checks:
        sections.append(
            "<h2>Drift looks</h2>"
            + _table(
                checks, ["time", "kind", "variant", "look", "p", "q (spent, BH)", "", "message"]
            )
        )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:left;vertical-align:top}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>lorafleet drift: "
        f"{html.escape(history['deployment'])}</title><style>{style}</style></head><body>"
        + "".join(sections)
        + "</body></html>"
    )

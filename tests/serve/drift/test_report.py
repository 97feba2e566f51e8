"""The drift report: one self-contained HTML page, a plot per kind of measurement it has data
for."""

from __future__ import annotations

import html
import re

import pytest

from lorafleet.serve.api.drift import DriftCheckPublic, DriftHistory, DriftStatus
from lorafleet.serve.drift.report import render_report
from lorafleet.serve.drift.schemas import FeedbackPeriod, FeedbackTimeline

T0 = 1_700_000_000.0


def _confidence_look(look: int, mean: float, drifted: bool, variant: str = "canary") -> dict:
    numbers = {
        "confidence_mean": mean,
        "baseline_confidence_mean": -0.3,
        "shift": mean + 0.3,
        "ks_statistic": 0.5,
        "n": 40,
        "n_baseline": 30,
    }
    p = 1e-9 if drifted else 0.4
    return DriftCheckPublic(
        variant=variant,
        kind="confidence",
        at=T0 + 60 * look,
        look=look,
        p=p,
        q=10 * p,
        drifted=drifted,
        numbers=numbers,
        message=f"{'DRIFT ' if drifted else 'no drift: '}confidence of {variant}",
    ).model_dump()


def _timeline(
    variant: str, version: str, periods: list[tuple[int, int, float | None]]
) -> FeedbackTimeline:
    return FeedbackTimeline(
        variant=variant,
        version=version,
        adapter="1" * 64,
        bucket_s=3600,
        periods=[
            FeedbackPeriod(
                start=T0 + 3600 * i,
                requests=requests,
                feedback=judged,
                rate=judged / requests if requests else None,
                mean=mean,
            )
            for i, (requests, judged, mean) in enumerate(periods)
        ],
    )


def _page(checks: list[dict], feedback: list[FeedbackTimeline]) -> str:
    history = DriftHistory(deployment="invoice", runs=[], checks=checks).model_dump()
    status = DriftStatus(
        deployment="invoice",
        sample_inputs=True,
        samples=40,
        validation_set="v" * 64,
        runs=[],
        input=None,
        output=[],
        feedback=feedback,
    ).model_dump()
    return render_report(history, status)


def _plots(page: str) -> list[str]:
    """The section titles that carry an image."""
    return [html.unescape(title) for title in re.findall(r"<h2>([^<]*)</h2><img", page)]


@pytest.mark.heavy_imports
def test_confidence_looks_and_the_feedback_timeline_are_plotted():
    checks = [
        _confidence_look(1, -0.31, False),
        _confidence_look(2, -0.95, True),
        _confidence_look(1, -0.29, False, variant="stable"),
    ]
    feedback = [
        _timeline("stable", "m@1", [(10, 2, 1.0), (0, 0, None), (8, 4, 0.75)]),
        _timeline("canary", "m@2", [(1, 0, None), (3, 3, 0.0), (0, 0, None)]),
    ]
    page = _page(checks, feedback)
    assert _plots(page) == [
        "Output confidence (live answers' mean token log-probability vs the baseline replay)",
        "Users' feedback per live version",
    ]
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page
    assert "ALARM" in page and "DRIFT confidence of canary" in page  # the looks' table


@pytest.mark.heavy_imports
def test_a_timeline_without_any_feedback_is_not_plotted():
    page = _page([], [_timeline("stable", "m@1", [(10, 0, None), (4, 0, None)])])
    assert _plots(page) == [] and "Nothing measured yet" in page


@pytest.mark.heavy_imports
def test_a_single_look_is_not_plotted_over_years_the_page_says_so():
    from lorafleet.serve.drift.report import NOT_ENOUGH

    page = _page([_confidence_look(1, -0.31, False)], [])
    assert _plots(page) == []
    assert f"</h2><p>{NOT_ENOUGH}</p>" in page and "data:image/png" not in page


@pytest.mark.heavy_imports
def test_the_legend_lists_a_baseline_only_where_one_is_drawn():
    from lorafleet.serve.drift.report import _detail, _pyplot

    looks = [_confidence_look(1, -0.31, False), _confidence_look(2, -0.35, False)]
    for look in looks:
        look["numbers"]["baseline_confidence_mean"] = None  # no baseline replay yet
    figure, axis = _pyplot().subplots()
    _detail(axis, "confidence", "canary", looks)
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == ["canary mean log-prob"]
    looks[1]["numbers"]["baseline_confidence_mean"] = -0.3
    figure, axis = _pyplot().subplots()
    _detail(axis, "confidence", "canary", looks)
    assert [line.get_label() for line in axis.get_lines()] == [
        "canary mean log-prob",
        "canary baseline",
    ]

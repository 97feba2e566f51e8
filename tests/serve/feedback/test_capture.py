"""Capture of live requests on a real catalog and a real capture store: the sampling and the
day's bound across gateways, content-addressed images, what the trainer could not read, the
opt-out, and deletion of captures with only the images nobody else references."""

from __future__ import annotations

import base64
import hashlib
import random
import threading
import time

import pytest
from sqlalchemy import func, select

from lorafleet.adapters.catalog import Capture, Deployment
from lorafleet.adapters.store import BlobStore
from lorafleet.errors import InvalidRequest
from lorafleet.serve.feedback.capture import (
    DAY_S,
    Capturer,
    CaptureSelection,
    capture_page,
    capture_status,
    delete_selected,
    image_ref,
    opt_out,
    restore_images,
    trainer_refusal,
)
from lorafleet.serve.feedback.records import TimeRange
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.types import Route
from tests.helpers import image_data_url, image_messages

NOON = 20_000 * DAY_S + 12 * 3600  # a fixed UTC noon: the day's bound counts from 00:00 UTC


def _capturer(
    sessions, images, rng: random.Random | None = None, max_bytes: int = 1 << 24
) -> Capturer:
    return Capturer(sessions, images, Metrics(), max_bytes, rng)


def _route(place, request_id: str, policy: dict | None = None) -> Route:
    return Route(
        deployment=place.deployment,
        digest=place.digest,
        deployment_id=place.deployment_id,
        request_id=request_id,
        capture=policy or {"sample_rate": 1.0, "max_per_day": 1000, "retention_days": 30.0},
    )


def _keep(
    capturer: Capturer,
    place,
    request_id: str,
    messages: list | None = None,
    now: float = NOON,
    confidence: float | None = -0.2,
) -> bool:
    return capturer.keep(
        place.tenant_id,
        _route(place, request_id),
        messages or image_messages(),
        "a red circle",
        confidence,
        now,
    )


def _rows(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Capture)) or 0


def _set_policy(sessions, place, policy: dict | None) -> None:
    with sessions() as s:
        s.get_one(Deployment, place.deployment_id).capture = policy
        s.commit()


def _sha(data_url: str) -> str:
    return hashlib.sha256(base64.b64decode(data_url.partition(",")[2])).hexdigest()


# --- how many are kept ---


def test_at_most_max_per_day_are_kept_in_a_day_across_gateways(sessions, images, place):
    invoice = place()
    _set_policy(sessions, invoice, {"sample_rate": 1.0, "max_per_day": 3, "retention_days": 30.0})
    gateways = [_capturer(sessions, images) for _ in range(3)]
    kept = [_keep(gateways[i % 3], invoice, f"chatcmpl-{i}") for i in range(8)]
    assert kept == [True, True, True, False, False, False, False, False] and _rows(sessions) == 3
    assert _keep(gateways[0], invoice, "chatcmpl-next-day", now=NOON + DAY_S)  # a new UTC day
    assert _rows(sessions) == 4


def test_concurrent_gateways_never_pass_the_day_bound(sessions, images, place):
    invoice = place()
    _set_policy(sessions, invoice, {"sample_rate": 1.0, "max_per_day": 3, "retention_days": 30.0})
    gateways = [_capturer(sessions, images) for _ in range(4)]
    start = threading.Barrier(12)
    results: list[bool] = []

    def one(i: int) -> None:
        start.wait()
        results.append(_keep(gateways[i % 4], invoice, f"chatcmpl-{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False] * 9 + [True] * 3 and _rows(sessions) == 3


def test_the_draw_keeps_about_the_sample_rate_and_a_seed_repeats_it(sessions, images, place):
    invoice = place()
    route = _route(
        invoice, "r", {"sample_rate": 0.5, "max_per_day": 1_000_000, "retention_days": 1.0}
    )
    capturer = _capturer(sessions, images, random.Random(7))
    draws = [capturer.wants(route, NOON) for _ in range(2000)]
    assert 900 <= sum(draws) <= 1100
    again = _capturer(sessions, images, random.Random(7))
    assert [again.wants(route, NOON) for _ in range(2000)] == draws
    off = Route(
        deployment=invoice.deployment, digest=invoice.digest, deployment_id=invoice.deployment_id
    )
    assert not any(capturer.wants(off, NOON) for _ in range(100))  # no policy: never drawn


def test_a_gateway_stops_drawing_once_it_saw_the_day_full(sessions, images, place):
    invoice = place()
    policy = {"sample_rate": 1.0, "max_per_day": 2, "retention_days": 30.0}
    _set_policy(sessions, invoice, policy)
    capturer = _capturer(sessions, images)
    assert _keep(capturer, invoice, "a") and _keep(capturer, invoice, "b")
    assert not capturer.wants(_route(invoice, "c", policy), NOON)
    assert capturer.wants(_route(invoice, "d", policy), NOON + DAY_S)


# --- what is kept ---


def test_an_image_sent_twice_is_stored_once_and_comes_back_as_sent(sessions, images, place):
    invoice = place()
    capturer = _capturer(sessions, images)
    sent = image_messages()
    assert _keep(capturer, invoice, "first", sent) and _keep(capturer, invoice, "second", sent)
    digest = _sha(sent[0]["content"][0]["image_url"]["url"])
    assert [d for d, _ in images.digests()] == [digest]
    with sessions() as s:
        rows = list(s.scalars(select(Capture).order_by(Capture.id)))
    assert [row.images for row in rows] == [[digest], [digest]]
    assert rows[0].messages[0]["content"][0]["image_url"]["url"] == image_ref("image/png", digest)
    assert (
        rows[0].answer == "a red circle"
        and rows[0].confidence_mean == -0.2
        and rows[0].variant == "stable"
    )
    assert restore_images(rows[0].messages, images) == sent


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "42", "tool_call_id": "t"}],
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": image_data_url()}}],
            },
        ],
        [{"role": "user", "content": [{"type": "input_image", "image_url": image_data_url()}]}],
        [{"role": "user", "content": []}],
        [{"role": "assistant", "content": None, "tool_calls": []}],
    ],
    ids=[
        "tool_role",
        "image_in_assistant_message",
        "responses_shape",
        "empty_content",
        "no_content",
    ],
)
def test_a_request_the_trainer_cannot_read_is_not_captured(sessions, images, place, messages):
    capturer = _capturer(sessions, images)
    assert not _keep(capturer, place(), "r", messages)
    assert _rows(sessions) == 0 and list(images.digests()) == []


def test_the_trainer_reads_system_text_and_user_images():
    stored = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": image_ref("image/png", "a" * 64), "detail": "low"},
                },
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And now?"},
    ]
    assert trainer_refusal(stored) is None
    remote = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
        }
    ]
    assert trainer_refusal(remote) is not None  # the trainer refuses to fetch images


def test_a_request_over_the_size_bound_is_not_captured(sessions, images, place):
    assert not _keep(_capturer(sessions, images, max_bytes=100), place(), "r")
    assert _rows(sessions) == 0 and list(images.digests()) == []


def test_after_the_opt_out_a_gateway_with_a_stale_route_keeps_nothing(sessions, images, place):
    invoice = place()
    _set_policy(sessions, invoice, None)
    assert not _keep(_capturer(sessions, images), invoice, "r")  # the route still says "capture"
    assert _rows(sessions) == 0 and list(images.digests()) == []


# --- listing, status, deletion ---


def test_captures_are_listed_newest_first_by_page_for_their_tenant_only(sessions, images, place):
    invoice, receipts, theirs = place(), place(deployment="receipts"), place(tenant="globex")
    capturer = _capturer(sessions, images)
    for i in range(3):
        _keep(capturer, invoice, f"inv-{i}", now=NOON + i)
    _keep(capturer, receipts, "rec-0", now=NOON + 10)
    _keep(capturer, theirs, "theirs", now=NOON + 20)
    with sessions() as s:
        first = capture_page(s, invoice.tenant_id, CaptureSelection(), None, 2)
        rest = capture_page(s, invoice.tenant_id, CaptureSelection(), first.next_cursor, 2)
        only = capture_page(
            s,
            invoice.tenant_id,
            CaptureSelection("invoice", TimeRange(NOON + 1, NOON + 2)),
            None,
            10,
        )
    assert [c.id for c in first.data] == ["rec-0", "inv-2"] and [c.id for c in rest.data] == [
        "inv-1",
        "inv-0",
    ]
    assert rest.next_cursor is None and [c.id for c in only.data] == ["inv-1"]
    assert first.data[0].deployment == "receipts" and first.data[0].adapter == receipts.digest
    with sessions() as s:
        for cursor in ("x", "\u00b2", "9" * 30):  # "²" is a digit to str.isdigit, not to int()
            with pytest.raises(InvalidRequest, match="invalid cursor"):
                capture_page(s, invoice.tenant_id, CaptureSelection(), cursor, 2)


def test_status_counts_the_captures_of_today_and_their_images(sessions, images, place):
    invoice = place()
    capturer = _capturer(sessions, images)
    _keep(capturer, invoice, "yesterday", now=NOON - DAY_S)
    _keep(capturer, invoice, "today", image_messages(color=(0, 0, 200)), now=NOON)
    _keep(capturer, invoice, "text", [{"role": "user", "content": "hello"}], now=NOON + 1)
    with sessions() as s:
        status = capture_status(s, s.get_one(Deployment, invoice.deployment_id), NOON + 2)
    assert (status.captures, status.today, status.images) == (3, 2, 2)
    assert status.policy is not None and status.policy.max_per_day == 1000 and status.bytes > 0


def test_deleting_a_capture_removes_only_images_no_other_capture_references(
    sessions, images, place
):
    invoice, theirs = place(), place(tenant="globex")
    capturer = _capturer(sessions, images)
    shared, own = image_messages(), image_messages(color=(0, 200, 0))
    both = [{"role": "user", "content": shared[0]["content"] + own[0]["content"]}]
    _keep(capturer, invoice, "shared-only", shared)
    _keep(capturer, invoice, "both", both)
    _keep(capturer, theirs, "theirs", shared)  # another tenant sent the same picture
    shared_digest, own_digest = (
        _sha(m[0]["content"][0]["image_url"]["url"]) for m in (shared, own)
    )
    deleted = delete_selected(
        sessions, images, invoice.tenant_id, CaptureSelection(request_id="both")
    )
    assert (deleted.captures, deleted.images) == (1, 1)
    assert {d for d, _ in images.digests()} == {shared_digest}
    assert (
        delete_selected(
            sessions, images, theirs.tenant_id, CaptureSelection(request_id="shared-only")
        ).captures
        == 0
    )
    everything = delete_selected(sessions, images, invoice.tenant_id, CaptureSelection())
    # the other tenant's capture still shows it
    assert (everything.captures, everything.images) == (1, 0)
    assert {d for d, _ in images.digests()} == {shared_digest} and _rows(sessions) == 1


def test_an_image_put_again_during_the_deletion_stays(sessions, images, place):
    invoice = place()
    sent = image_messages()
    _keep(_capturer(sessions, images), invoice, "old", sent)
    data = base64.b64decode(sent[0]["content"][0]["image_url"]["url"].partition(",")[2])

    class RacingImages(BlobStore):
        def delete(self, digest, keep=lambda: False, if_unmodified_since=None):
            time.sleep(0.01)
            # a capture of the same picture, whose row commits after the deletion's look
            self.put(data)
            return super().delete(digest, keep=keep, if_unmodified_since=if_unmodified_since)

    racing = RacingImages(images.root, "")
    deleted = delete_selected(sessions, racing, invoice.tenant_id, CaptureSelection())
    assert (deleted.captures, deleted.images) == (1, 0) and images.path(
        hashlib.sha256(data).hexdigest()
    ).is_file()


def test_opting_out_deletes_the_deployment_captures_and_stops_capturing(sessions, images, place):
    invoice, receipts = place(), place(deployment="receipts")
    capturer = _capturer(sessions, images)
    _keep(capturer, invoice, "inv", image_messages())
    _keep(capturer, receipts, "rec", image_messages(color=(0, 0, 200)))
    with sessions() as s:
        deleted = opt_out(s, sessions, images, s.get_one(Deployment, invoice.deployment_id))
        assert s.get_one(Deployment, invoice.deployment_id).capture is None
    assert (deleted.captures, deleted.images) == (1, 1) and len(list(images.digests())) == 1
    with sessions() as s:
        assert list(s.scalars(select(Capture.request_id))) == ["rec"]
    assert not _keep(capturer, invoice, "after")

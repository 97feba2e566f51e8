"""Switching a deployment's version: served on the next request, no restart, no failed request."""

from __future__ import annotations

import concurrent.futures
import time

from tests.helpers import image_messages, upload_folder


def _ask(client, deployment: str = "swap") -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=deployment, messages=image_messages(), max_tokens=6, temperature=0
    )
    return raw.headers["x-lorafleet-adapter"], raw.parse().choices[0].message.content


def test_switch_serves_the_new_version_next_without_failed_requests(new_tenant, make_adapter):
    tenant = new_tenant()
    client = tenant.openai()
    with tenant.http() as http:
        v1 = upload_folder(http, "ext", make_adapter(4))
        v2 = upload_folder(http, "ext", make_adapter(5))
        assert http.put("/v1/deployments/swap", json={"adapter": "ext@1"}).status_code == 200
        digest1, out1 = _ask(client)
        assert http.put("/v1/deployments/swap", json={"adapter": "ext@2"}).status_code == 200
        digest2, out2 = _ask(client)
    assert (digest1, digest2) == (v1["digest"], v2["digest"]) and out1 != out2

    # swap back and forth while requests are in flight: every request succeeds with one of the two
    outputs = {v1["digest"]: out1, v2["digest"]: out2}
    deadline = time.monotonic() + 8
    with concurrent.futures.ThreadPoolExecutor(4) as pool, tenant.http() as http:
        futures = [pool.submit(_ask, client) for _ in range(24)]
        flips = 0
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            http.put(
                "/v1/deployments/swap", json={"adapter": f"ext@{1 + flips % 2}"}
            ).raise_for_status()
            flips += 1
        results = [f.result() for f in futures]
    assert all(outputs[digest] == text for digest, text in results)


def test_reuploaded_name_never_serves_stale_weights(new_tenant, make_adapter):
    tenant = new_tenant()
    client = tenant.openai()
    with tenant.http() as http:
        first = upload_folder(http, "ext", make_adapter(6))
        http.put("/v1/deployments/swap", json={"adapter": "ext"}).raise_for_status()
        digest_a, out_a = _ask(client)
        second = upload_folder(http, "ext", make_adapter(7))  # same name, new weights
        http.put("/v1/deployments/swap", json={"adapter": "ext"}).raise_for_status()
        digest_b, out_b = _ask(client)
    assert (digest_a, digest_b) == (first["digest"], second["digest"])
    assert out_a != out_b


def test_deploy_by_digest(new_tenant, make_adapter):
    tenant = new_tenant()
    with tenant.http() as http:
        version = upload_folder(http, "ext", make_adapter(4))
        response = http.put(
            "/v1/deployments/by-digest", json={"adapter": f"sha256:{version['digest']}"}
        )
    assert response.status_code == 200 and response.json()["adapter"]["version"] == 1
    assert _ask(tenant.openai(), "by-digest")[0] == version["digest"]

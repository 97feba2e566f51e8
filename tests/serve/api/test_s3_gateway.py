"""`lorafleet serve` with an S3 store: an upload lands in the bucket, and a chat fetches the
adapter into the engine host's cache (verified) before the engine loads it from there."""

from __future__ import annotations

import uuid

import boto3
import httpx

from lorafleet.adapters.s3_store import MANIFEST, parse_s3_url
from tests.helpers import image_messages, upload_folder


def test_an_s3_store_serves_an_uploaded_adapter(server, s3_url, make_adapter, tmp_path):
    """A second gateway on the session's engine, with its adapters in S3 (nothing under its home
    but the cache)."""
    url = f"{s3_url}/{uuid.uuid4().hex[:8]}"
    home = tmp_path / "s3-gateway"
    gateway = server.attach(home, store_url=url)
    digest = None
    try:
        gateway.wait_ready(120)
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_key}"}
        ) as admin:
            key = admin.post("/admin/tenants", json={"name": "s3"}).json()["api_key"]
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            digest = upload_folder(http, "ext", make_adapter(41))["digest"]
            http.put("/v1/deployments/prod", json={"adapter": "ext@1"}).raise_for_status()
            answer = http.post(
                "/v1/chat/completions",
                json={"model": "prod", "messages": image_messages(), "max_tokens": 4},
            )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-lorafleet-adapter"] == digest and answer.json()["model"] == "prod"
        location = parse_s3_url(url)
        manifest = location.key("adapters", digest, MANIFEST)
        boto3.client("s3").head_object(Bucket=location.bucket, Key=manifest)  # stored in the bucket
        assert not (home / "adapters").exists()
        assert (home / "cache" / "adapters" / digest / "adapter_model.safetensors").is_file()
    finally:
        gateway.stop()
        if digest:
            server.unload(digest)

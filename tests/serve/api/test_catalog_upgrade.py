"""`lorafleet serve` on a catalog lorafleet 0.1.0 left, with real adapters in its store: refused
until asked to upgrade it, then every row serves: the old key authenticates, the deployment
answers chat with its adapter, and the finished rollout's history shows."""

from __future__ import annotations

import httpx
import pytest

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.adapters.store import LocalStore
from lorafleet.adapters.validate import validate_adapter_dir
from lorafleet.serve.dev.local_server import LocalServer
from tests.conftest import MAX_RANK
from tests.helpers import image_messages
from tests.old_catalog import create_schema, insert_rows


def test_a_0_1_0_install_is_refused_then_upgraded_and_serves(server, make_adapter, tmp_path):
    """A second gateway on the session's engine, on a home made by 0.1.0: its catalog and its
    adapter store."""
    home = tmp_path / "home-0.1.0"
    store, spec = LocalStore(home / "adapters"), load_base_spec(server.base)
    validated = [validate_adapter_dir(make_adapter(seed), spec, MAX_RANK) for seed in (43, 44)]
    for adapter in validated:
        store.put(adapter)
    url = f"sqlite:///{home / 'catalog.db'}"
    create_schema(url)
    rows = insert_rows(url, digests=(validated[0].digest, validated[1].digest))
    token = server.env["LORAFLEET_ENGINE_API_KEY"]
    settings = dict(
        engine_url=server.engine_url,
        engine_api_key=token,
        max_model_len="512",
        max_lora_rank=str(MAX_RANK),
        dtype="float32",
        drift_replay_s="0",
    )

    refused = LocalServer.start(server.base, home, **settings)
    with pytest.raises(RuntimeError, match="exited with 1"):
        refused.wait_ready(120)
    log = (home / "gateway.log").read_text()
    assert (
        "CatalogBehind: the catalog" in log
        and "run `lorafleet db upgrade`" in log
        and "Traceback" not in log
    )

    gateway = LocalServer.start(server.base, home, catalog_auto_upgrade="true", **settings)
    try:
        gateway.wait_ready(120)
        assert len(list(home.glob("catalog.db.before-unversioned-*"))) == 1
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {rows.key}"}, timeout=120
        ) as http:
            answer = http.post(
                "/v1/chat/completions",
                json={"model": rows.deployment, "messages": image_messages(), "max_tokens": 4},
            )
            history = http.get(f"/v1/deployments/{rows.deployment}/rollout")
        assert answer.status_code == 200, answer.text
        assert (
            answer.headers["x-lorafleet-adapter"] == rows.digests[1]
            and answer.json()["model"] == rows.deployment
        )
        assert history.status_code == 200, history.text
        assert history.json()["phase"] == "Promoted"
        assert tuple(d["action"] for d in history.json()["decisions"]) == rows.decisions
    finally:
        gateway.stop()
        # the engine is the session's: it must not keep names whose folders are this test's
        for digest in rows.digests:
            httpx.post(
                f"{server.engine_url}/v1/unload_lora_adapter",
                json={"lora_name": digest},
                headers={"Authorization": f"Bearer {token}"},
            )

"""The console's pages, sessions and CSRF checks on a real gateway app (catalog and store real,
no engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorafleet.serve.console.session import LOGIN_COOKIE, SESSION_COOKIE
from lorafleet.serve.gateway_client import pack_adapter
from tests.helpers import assert_openai_error
from tests.serve.console.conftest import ADMIN_KEY, Console, csrf_of

NEAR_BASE_STD = 1e-6

pytestmark = pytest.mark.heavy_imports  # transformers (the base, its adapters) and matplotlib


@pytest.fixture(scope="session")
def adapters(untrained_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lorafleet.train.random_adapter import make_random_adapter

    return [
        make_random_adapter(
            untrained_base,
            tmp_path_factory.mktemp(f"console-adapter-{rank}"),
            seed=0,
            rank=rank,
            std=NEAR_BASE_STD,
        )
        for rank in (8, 4)
    ]


async def _deployed_canary(console: Console, key: str, adapters: list[Path]) -> None:
    """Deployment `shapes` on m@1, with a canary to m@2 at 20 % that waits for a million
    requests."""
    async with console.api(key) as api:
        for folder in adapters:
            archive = pack_adapter(folder)
            with open(archive, "rb") as f:
                uploaded = await api.post(
                    "/v1/adapters",
                    data={"name": "m"},
                    files={"file": ("a.tar.gz", f.read(), "application/gzip")},
                )
            archive.unlink()
            assert uploaded.status_code in (200, 201), uploaded.text
        (await api.put("/v1/deployments/shapes", json={"adapter": "m@1"})).raise_for_status()
        started = await api.post(
            "/v1/deployments/shapes/rollout",
            json={"to": "m@2", "gate": False, "steps": [20, 100], "min_requests": 10**6},
        )
        assert started.status_code == 202, started.text
        (await api.put("/v1/deployments/split", json={"adapter": "m@1"})).raise_for_status()
        split = await api.post(
            "/v1/deployments/split/ab",
            json={"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@2", "weight": 50}]},
        )
        assert split.status_code == 201, split.text


async def test_sign_in_keeps_the_key_in_an_http_only_same_site_cookie_and_never_in_the_page(
    console, browser_session
):
    acme = console.name("acme")
    key = await console.tenant(acme)
    browser = await browser_session(key)
    cookie = next(c for c in browser.cookies.jar if c.name == SESSION_COOKIE)
    assert key not in cookie.value  # sealed, not merely encoded
    page = await browser.get("/console/deployments")
    assert page.status_code == 200 and f"tenant <strong>{acme}</strong>" in page.text
    assert key not in page.text and key not in str(page.url)
    assert "default-src 'none'" in page.headers["content-security-policy"]
    login = await console.http.get("/console/login")
    set_cookie = login.headers["set-cookie"].lower()
    assert (
        LOGIN_COOKIE in set_cookie and "httponly" in set_cookie and "samesite=strict" in set_cookie
    )
    signed = await browser.post("/console/login", data={"csrf": csrf_of(login.text), "key": key})
    assert signed.status_code == 403  # the form's token is not this browser's login cookie


async def test_the_session_cookie_is_http_only_and_strict(console):
    key = await console.tenant(console.name("acme"))
    form = await console.http.get("/console/login")
    signed = await console.http.post(
        "/console/login", data={"csrf": csrf_of(form.text), "key": key}
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/console/deployments"
    cookie = next(
        h for h in signed.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")
    )
    assert (
        "httponly" in cookie.lower()
        and "samesite=strict" in cookie.lower()
        and "path=/console" in cookie.lower()
    )


async def test_a_wrong_key_is_refused_with_a_message_and_no_session(console):
    form = await console.http.get("/console/login")
    refused = await console.http.post(
        "/console/login", data={"csrf": csrf_of(form.text), "key": "not-a-key"}
    )
    assert refused.status_code == 401 and "Sign-in refused" in refused.text
    assert not any(
        h.startswith(SESSION_COOKIE + "=") for h in refused.headers.get_list("set-cookie")
    )
    assert (await console.http.get("/console/deployments")).status_code == 303


async def test_a_page_without_a_session_sends_the_browser_to_sign_in(console):
    page = await console.http.get("/console/rollouts")
    assert (
        page.status_code == 303
        and page.headers["location"] == "/console/login?next=/console/rollouts"
    )
    live = await console.http.get(
        "/console/t/x/deployments/y/rollout/live", headers={"HX-Request": "true"}
    )
    assert live.status_code == 204 and live.headers["hx-redirect"].startswith("/console/login")
    forged = await console.http.get(
        "/console/deployments", headers={"Cookie": f"{SESSION_COOKIE}=gAAAAAforged"}
    )
    assert forged.status_code == 303


async def test_sign_in_only_redirects_within_the_console(console):
    key = await console.tenant(console.name("acme"))
    form = await console.http.get("/console/login")
    signed = await console.http.post(
        "/console/login",
        data={"csrf": csrf_of(form.text), "key": key, "next": "//evil.example/console/"},
    )
    assert signed.headers["location"] == "/console/deployments"


async def test_actions_need_the_session_token_and_the_same_origin(
    console, browser_session, adapters
):
    acme = console.name("acme")
    key = await console.tenant(acme)
    await _deployed_canary(console, key, adapters)
    browser = await browser_session(key)
    action = f"/console/t/{acme}/deployments/shapes/actions/abort"
    assert (await browser.post(action, data={})).status_code == 403
    assert (await browser.post(action, data={"csrf": "guess"})).status_code == 403
    confirm = await browser.get(f"/console/t/{acme}/deployments/shapes/confirm/abort")
    assert confirm.status_code == 200 and "Yes, abort" in confirm.text
    token = csrf_of(confirm.text)
    foreign = await browser.post(
        action, data={"csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and "another site" in foreign.text
    async with console.api(key) as api:
        assert (await api.get("/v1/deployments/shapes/rollout")).json()["phase"] == "Progressing"
    done = await browser.post(action, data={"csrf": token}, headers={"Origin": "http://testserver"})
    assert done.status_code == 303 and done.headers["location"].endswith("/rollout?done=abort")
    page = await browser.get(done.headers["location"])
    assert re.search(r'id="phase"><span class="phase phase-Aborted">Aborted', page.text)
    assert f"by tenant:{acme}" in page.text  # the decision names who acted, as the API records it
    assert 'hx-trigger="every 5s"' not in page.text  # a finished rollout is no longer polled
    assert (
        "RolloutStarted</span> · before the first step" in page.text
        and "AbortedByUser</span> · step 1" in page.text
    )


async def test_every_page_renders_for_a_tenant_and_the_admin(
    console, browser_session, adapters, tmp_path
):
    from lorafleet.serve.gateway_client import inline_images
    from lorafleet.train.shapes import write_task

    acme = console.name("acme")
    key = await console.tenant(acme)
    await _deployed_canary(console, key, adapters)
    validation = inline_images(write_task("general", 6, tmp_path / "val.jsonl", seed=1))
    async with console.api(key) as api:
        pushed = await api.put(
            "/v1/deployments/shapes/validation", files={"file": ("v.jsonl", validation)}
        )
        assert pushed.status_code == 200, pushed.text
        line = {
            "custom_id": "one",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "shapes", "messages": [{"role": "user", "content": "hi"}]},
        }
        uploaded = await api.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("b.jsonl", json.dumps(line).encode())},
        )
        assert uploaded.status_code == 200, uploaded.text
        batch = await api.post(
            "/v1/batches",
            json={
                "input_file_id": uploaded.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
    tenant = await browser_session(key)
    base = f"/console/t/{acme}"
    for path in (
        "/console/deployments",
        "/console/rollouts",
        "/console/adapters",
        "/console/batches",
        f"{base}/deployments/shapes",
        f"{base}/deployments/shapes/rollout",
        f"{base}/deployments/shapes/rollout/live",
        f"{base}/deployments/shapes/ab",
        f"{base}/deployments/split/ab",
        f"{base}/deployments/shapes/drift",
        f"{base}/adapters/m",
        f"{base}/deployments/shapes/confirm/pause",
        f"{base}/deployments/shapes/confirm/undo",
    ):
        page = await tenant.get(path)
        assert page.status_code == 200, (path, page.text[-2000:])
        assert key not in page.text
    assert 'hx-trigger="every 5s"' in (await tenant.get(f"{base}/deployments/shapes/rollout")).text
    deployments = (await tenant.get("/console/deployments")).text
    # the live routing the API answers
    assert "m@1 — 80" in deployments and "m@2 — 20" in deployments
    assert "6 items, exact_match" in deployments and "built-in method" not in deployments
    assert "6 items, metric exact_match" in (await tenant.get(f"{base}/deployments/shapes")).text
    batches = (await tenant.get("/console/batches")).text
    assert batch.json()["id"] in batches and '<progress max="1"' in batches
    adapter = (await tenant.get(f"{base}/adapters/m")).text
    assert "m@2" in adapter and "m@1" in adapter and "q_proj" in adapter
    for path in ("/console/engines", "/console/tenants"):
        # the admin's pages do not exist for a tenant
        assert (await tenant.get(path)).status_code == 404

    admin = await browser_session(ADMIN_KEY)
    for path in (
        "/console/deployments",
        "/console/rollouts",
        "/console/adapters",
        "/console/batches",
        "/console/tenants",
        "/console/engines",
        f"{base}/deployments/shapes/rollout",
        f"{base}/adapters/m",
    ):
        page = await admin.get(path)
        assert page.status_code == 200, (path, page.text[-2000:])
        assert ADMIN_KEY not in page.text
    tenants = (await admin.get("/console/tenants")).text
    # one live key (the row's first number; the module's other tests have tenants of their own)
    assert re.search(
        rf'<th scope="row">{acme}</th>\s*<td>.*?</td>\s*<td class="num">1</td>', tenants, re.S
    )
    assert "built-in method" not in tenants
    assert "admin (all tenants)" in (await admin.get("/console/deployments")).text


async def test_an_adapter_page_shows_the_trainers_manifest(
    console, browser_session, adapters, tmp_path
):
    import shutil

    from lorafleet.adapters.validate import content_digest

    folder = shutil.copytree(adapters[0], tmp_path / "with-manifest")
    manifest = {
        "adapter_digest": content_digest(folder),
        "training": {
            "steps": 76,
            "best_val_loss": 0.0412,
            "stopped_early": True,
            "converged": True,
            "samples_per_s": 31.5,
            "peak_memory_mb": 812.0,
            "advice": [],
        },
        "evaluation": {
            "sets": [
                {
                    "name": "validation",
                    "metric": "json_fields",
                    "n": 40,
                    "base": 0.0,
                    "adapter": 0.975,
                },
                {"name": "probe", "metric": "exact", "n": 50, "base": 0.98, "adapter": 0.96},
            ],
            "verdicts": [],
        },
        "servability": {
            "digest": "x",
            "prompts": 8,
            "changed": 8,
            "agreed_tokens": 4,
            "near_ties": 0,
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    acme = console.name("acme")
    key = await console.tenant(acme)
    async with console.api(key) as api:
        archive = pack_adapter(folder)
        uploaded = await api.post(
            "/v1/adapters",
            data={"name": "m"},
            files={"file": ("a.tar.gz", archive.read_bytes(), "application/gzip")},
        )
        archive.unlink()
        assert uploaded.status_code == 201, uploaded.text
    page = (await (await browser_session(key)).get(f"/console/t/{acme}/adapters/m")).text
    assert "records this digest" in page  # manifest_matches, as the API answers it
    assert "0.975" in page and "forgetting probe" in page and "76" in page and "0.0412" in page


async def test_a_tenant_never_sees_another_tenants_things(console, browser_session, adapters):
    acme = console.name("acme")
    owner, other = await console.tenant(acme), await console.tenant(console.name("globex"))
    await _deployed_canary(console, owner, adapters)
    stranger = await browser_session(other)
    for path in (
        f"/console/t/{acme}/deployments/shapes",
        f"/console/t/{acme}/deployments/shapes/rollout",
        f"/console/t/{acme}/adapters/m",
        f"/console/t/{acme}/deployments/shapes/confirm/abort",
    ):
        assert (await stranger.get(path)).status_code == 404, path
    token = csrf_of((await stranger.get("/console/deployments")).text)
    refused = await stranger.post(
        f"/console/t/{acme}/deployments/shapes/actions/abort", data={"csrf": token}
    )
    assert refused.status_code == 404
    for path in ("/console/deployments", "/console/rollouts", "/console/adapters"):
        assert "shapes" not in (await stranger.get(path)).text
    async with console.api(owner) as api:
        assert (await api.get("/v1/deployments/shapes/rollout")).json()["phase"] == "Progressing"


async def test_sign_out_ends_the_session(console, browser_session):
    key = await console.tenant(console.name("acme"))
    browser = await browser_session(key)
    token = csrf_of((await browser.get("/console/deployments")).text)
    assert (await browser.post("/console/logout", data={})).status_code == 403
    out = await browser.post("/console/logout", data={"csrf": token})
    assert out.status_code == 303 and 'lorafleet_console=""' in out.headers["set-cookie"]
    assert (await browser.get("/console/deployments")).status_code == 303


async def test_a_revoked_key_signs_the_console_out(console, browser_session):
    acme = console.name("acme")
    key = await console.tenant(acme)
    browser = await browser_session(key)
    keys = (await console.admin.get(f"/admin/tenants/{acme}/keys")).json()
    (await console.admin.delete(f"/admin/tenants/{acme}/keys/{keys[0]['id']}")).raise_for_status()
    page = await browser.get("/console/deployments")
    assert page.status_code == 303 and page.headers["location"].startswith("/console/login")


# the admin acting for a tenant (what the console does for the admin's views)


async def test_acting_for_a_tenant_needs_the_admin_key(console):
    acme_name, globex_name = console.name("acme"), console.name("globex")
    acme, globex = await console.tenant(acme_name), await console.tenant(globex_name)
    async with console.api(acme) as api:
        mine = await api.get("/v1/tenant")
        assert mine.json() == {"name": acme_name, "acting_as": f"tenant:{acme_name}"}
        refused = await api.get("/v1/deployments", headers={"X-Lorafleet-Tenant": globex_name})
        assert_openai_error(refused, 401, "X-Lorafleet-Tenant needs the admin key")
    acting = await console.admin.get("/v1/tenant", headers={"X-Lorafleet-Tenant": globex_name})
    assert acting.status_code == 200 and acting.json()["name"] == globex_name
    assert acting.json()["acting_as"].startswith("admin@")
    assert_openai_error(
        await console.admin.get("/v1/deployments", headers={"X-Lorafleet-Tenant": "nobody"}), 404
    )
    chat = await console.admin.post(
        "/v1/chat/completions",
        headers={"X-Lorafleet-Tenant": acme_name},
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert_openai_error(chat, 400)
    del globex


async def test_a_finished_canary_shows_the_weights_that_serve_now(
    console, browser_session, adapters
):
    acme = console.name("acme")
    key = await console.tenant(acme)
    await _deployed_canary(console, key, adapters)
    async with console.api(key) as api:
        running = (await api.get("/v1/deployments/shapes/rollout")).json()
        assert [(v["label"], v["weight"]) for v in running["variants"]] == [
            ("canary", 20),
            ("stable", 80),
        ]
        aborted = await api.post("/v1/deployments/shapes/rollout/abort")
        assert aborted.status_code == 200, aborted.text
        after = (await api.get("/v1/deployments/shapes/rollout")).json()
        listed = (await api.get("/v1/rollouts")).json()
    # the stable serves every request again: in the rollout, the list and the console alike
    assert [v["weight"] for v in after["variants"]] == [0, 100]
    assert [v["weight"] for v in listed[0]["variants"]] == [0, 100]
    browser = await browser_session(key)
    page = await browser.get(f"/console/t/{acme}/deployments/shapes/rollout")
    rows = re.findall(
        r'<tr><th scope="row">(\w+)</th>.*?<td class="num">([\d.]+) %</td></tr>', page.text
    )
    assert rows == [("canary", "0.0"), ("stable", "100.0")]

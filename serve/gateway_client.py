"""A small HTTP client of the lorafleet API, used by the CLI and the demo."""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from lorafleet.errors import ApiError, LorafleetError, ServerUnreachable

__all__ = ["LorafleetClient", "pack_adapter", "inline_images"]


def inline_images(path: Path) -> bytes:
    """A chat JSONL file (the training format) with its local image paths replaced by data URLs."""
    import json

    from lorafleet.chat_jsonl import answer_of, load_jsonl, request_messages

    lines = [
        json.dumps(
            {"messages": [*request_messages(e), {"role": "assistant", "content": answer_of(e)}]}
        )
        for e in load_jsonl(path)
    ]
    return ("\n".join(lines) + "\n").encode()


def pack_adapter(folder: Path) -> Path:
    """A PEFT adapter folder's files as a .tar.gz in a temporary file (the caller deletes it):
    the trainer's manifest.json too, when the folder has one (the gateway keeps it on the
    version)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise LorafleetError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    handle, name = tempfile.mkstemp(suffix=".tar.gz")
    with open(handle, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    return Path(name)


class _ProgressReader(io.RawIOBase):
    """A file whose reads report how many bytes went out."""

    def __init__(self, raw: BinaryIO, advance: Callable[[int], None]) -> None:
        self.raw, self.advance = raw, advance

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.advance(len(chunk))
        return chunk


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_error:
        try:
            error = response.json()["error"]
            raise ApiError(response.status_code, error["message"], error.get("code"))
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, response.text[:300], None) from None


def _given(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


class LorafleetClient:
    """Thin calls to the gateway; every non-2xx answer raises ApiError."""

    def __init__(self, url: str, key: str | None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.http.base_url}: {exc}") from exc
        _raise_for_error(response)
        return response.json()

    def create_tenant(self, name: str) -> dict:
        return self._call("POST", "/admin/tenants", json={"name": name})

    def list_tenants(self) -> list[str]:
        return self._call("GET", "/admin/tenants")

    def get_tenant(self, name: str) -> dict:
        return self._call("GET", f"/admin/tenants/{name}")

    def set_limits(self, name: str, changes: dict[str, int | None]) -> dict:
        return self._call("PUT", f"/admin/tenants/{name}/limits", json=changes)

    def get_limits(self, name: str) -> dict:
        return self._call("GET", f"/admin/tenants/{name}/limits")

    def prices(self, name: str) -> dict:
        return self._call("GET", f"/admin/tenants/{name}/prices")

    def set_prices(self, name: str, changes: dict[str, float | None]) -> dict:
        return self._call("PUT", f"/admin/tenants/{name}/prices", json=changes)

    def budgets(self, name: str) -> dict:
        return self._call("GET", f"/admin/tenants/{name}/budgets")

    def set_budget(self, name: str, period: str, budget: dict[str, Any]) -> dict:
        return self._call("PUT", f"/admin/tenants/{name}/budgets/{period}", json=budget)

    def delete_budget(self, name: str, period: str) -> dict:
        return self._call("DELETE", f"/admin/tenants/{name}/budgets/{period}")

    def usage(self, **params: Any) -> dict:
        """The usage report (JSON); `usage_csv` for its CSV."""
        return self._call("GET", "/v1/usage", params=_given(params))

    def usage_csv(self, **params: Any) -> str:
        try:
            response = self.http.get("/v1/usage", params=_given(params) | {"format": "csv"})
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.http.base_url}: {exc}") from exc
        _raise_for_error(response)
        return response.text

    def objective(self, tenant: str, deployment: str) -> dict:
        return self._call("GET", f"/admin/tenants/{tenant}/deployments/{deployment}/objective")

    def set_objective(self, tenant: str, deployment: str, objective: str | None) -> dict:
        return self._call(
            "PUT",
            f"/admin/tenants/{tenant}/deployments/{deployment}/objective",
            json={"objective": objective},
        )

    def list_keys(self, name: str) -> list[dict]:
        return self._call("GET", f"/admin/tenants/{name}/keys")

    def create_key(self, name: str, label: str = "", expires_in_s: float | None = None) -> dict:
        return self._call(
            "POST",
            f"/admin/tenants/{name}/keys",
            json={"label": label, "expires_in_s": expires_in_s},
        )

    def revoke_key(self, name: str, key_id: int) -> dict:
        return self._call("DELETE", f"/admin/tenants/{name}/keys/{key_id}")

    def rotate_key(self, name: str, key_id: int, grace_s: float) -> dict:
        return self._call(
            "POST", f"/admin/tenants/{name}/keys/{key_id}/rotate", json={"grace_s": grace_s}
        )

    def disable_tenant(self, name: str, reason: str) -> dict:
        return self._call("POST", f"/admin/tenants/{name}/disable", json={"reason": reason})

    def enable_tenant(self, name: str) -> dict:
        return self._call("POST", f"/admin/tenants/{name}/enable")

    def delete_tenant(self, name: str, force: bool) -> dict:
        return self._call("DELETE", f"/admin/tenants/{name}", params={"force": str(force).lower()})

    def audit(
        self, tenant: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict]:
        params = {
            k: v
            for k, v in {"tenant": tenant, "limit": limit, "before": before}.items()
            if v is not None
        }
        return self._call("GET", "/admin/audit", params=params)

    def engines(self) -> dict:
        """The fleet: placement policy, counts, and every engine replica with its state, queue
        and adapters."""
        return self._call("GET", "/admin/engines")

    def push_adapter(
        self, name: str, folder: Path, progress: Callable[[int, int], None] | None = None
    ) -> dict:
        """Pack and upload an adapter folder; `progress(sent, total)` is called as bytes go out.
        The folder is checked, then the key: a refused one costs no upload."""
        archive = pack_adapter(folder)
        try:
            self.tenant()
            total, sent = archive.stat().st_size, 0

            def advance(n: int) -> None:
                nonlocal sent
                sent += n
                if progress:
                    progress(sent, total)

            with open(archive, "rb") as raw:
                files = {
                    "file": (f"{name}.tar.gz", _ProgressReader(raw, advance), "application/gzip")
                }
                return self._call("POST", "/v1/adapters", data={"name": name}, files=files)
        finally:
            archive.unlink(missing_ok=True)

    def tenant(self) -> dict:
        """The tenant of this client's key (`GET /v1/tenant`): ApiError 401 for a missing, wrong or
        revoked key."""
        return self._call("GET", "/v1/tenant")

    def list_adapters(self) -> list[dict]:
        return self._call("GET", "/v1/adapters")

    def get_adapter(self, name: str) -> dict:
        return self._call("GET", f"/v1/adapters/{name}")

    def delete_version(self, name: str, version: int) -> dict:
        return self._call("DELETE", f"/v1/adapters/{name}/versions/{version}")

    def deploy(self, deployment: str, adapter: str) -> dict:
        return self._call("PUT", f"/v1/deployments/{deployment}", json={"adapter": adapter})

    def list_deployments(self) -> list[dict]:
        return self._call("GET", "/v1/deployments")

    # --- traffic control ---

    def push_validation(self, deployment: str, path: Path, metric: str) -> dict:
        """Upload a chat JSONL validation set; local image paths are inlined as data URLs first
        (the key checked before)."""
        self.tenant()
        files = {"file": (Path(path).name, inline_images(path), "application/jsonl")}
        return self._call(
            "PUT", f"/v1/deployments/{deployment}/validation", data={"metric": metric}, files=files
        )

    def get_validation(self, deployment: str) -> dict:
        return self._call("GET", f"/v1/deployments/{deployment}/validation")

    def set_answer_format(self, deployment: str, spec: dict) -> dict:
        return self._call("PUT", f"/v1/deployments/{deployment}/answer-format", json=spec)

    def start_rollout(self, deployment: str, **params: Any) -> dict:
        return self._call("POST", f"/v1/deployments/{deployment}/rollout", json=params)

    def rollout(self, deployment: str) -> dict:
        return self._call("GET", f"/v1/deployments/{deployment}/rollout")

    def rollouts(self) -> list[dict]:
        return self._call("GET", "/v1/rollouts")

    def rollout_series(self, deployment: str, bucket_s: float | None = None) -> dict:
        """The rollout's per-variant periods (`bucket_s` seconds; None: the server picks at most
        ~60)."""
        return self._call(
            "GET",
            f"/v1/deployments/{deployment}/rollout/series",
            params=_given({"bucket_s": bucket_s}),
        )

    def rollout_action(self, deployment: str, action: str, **body: Any) -> dict:
        """pause | resume | abort | promote (full=True for straight to 100 %)."""
        return self._call(
            "POST", f"/v1/deployments/{deployment}/rollout/{action}", json=body or None
        )

    def undo(self, deployment: str) -> dict:
        return self._call("POST", f"/v1/deployments/{deployment}/undo")

    def start_ab(self, deployment: str, variants: list[tuple[str, float]]) -> dict:
        body = {"variants": [{"adapter": ref, "weight": weight} for ref, weight in variants]}
        return self._call("POST", f"/v1/deployments/{deployment}/ab", json=body)

    def ab_status(self, deployment: str) -> dict:
        return self._call("GET", f"/v1/deployments/{deployment}/ab")

    def ab_evaluate(self, deployment: str) -> dict:
        return self._call("POST", f"/v1/deployments/{deployment}/ab/evaluate")

    def stop_ab(self, deployment: str, keep: str | None) -> dict:
        return self._call("POST", f"/v1/deployments/{deployment}/ab/stop", json={"keep": keep})

    def drift_check(self, deployment: str) -> list[dict]:
        return self._call("POST", f"/v1/deployments/{deployment}/drift/check")

    def drift_look(self, deployment: str) -> dict:
        return self._call("POST", f"/v1/deployments/{deployment}/drift/look")

    def drift_status(self, deployment: str | None = None) -> list[dict]:
        if deployment:
            return [self._call("GET", f"/v1/deployments/{deployment}/drift")]
        return self._call("GET", "/v1/drift")

    def drift_history(self, deployment: str) -> dict:
        return self._call("GET", f"/v1/deployments/{deployment}/drift/history")

    def drift_sampling(self, enabled: bool) -> dict:
        return self._call("PUT", "/v1/drift/sampling", json={"sample_inputs": enabled})

    # --- the feedback loop ---

    def send_feedback(
        self, request_id: str, score: float, correction: str | None = None, comment: str = ""
    ) -> dict:
        return self._call(
            "POST",
            "/v1/feedback",
            json={"id": request_id, "score": score, "correction": correction, "comment": comment},
        )

    def feedback(self, **params: Any) -> dict:
        """A page of feedback: deployment, since, until, cursor, limit."""
        return self._call("GET", "/v1/feedback", params=_given(params))

    def requests(self, **params: Any) -> dict:
        """A page of the request log: deployment, since, until, cursor, limit."""
        return self._call("GET", "/v1/requests", params=_given(params))

    def traffic(self, deployment: str, window_s: float | None = None) -> dict:
        """The deployment's requests, errors and latency over the last `window_s` seconds (None:
        the default)."""
        return self._call(
            "GET", f"/v1/deployments/{deployment}/traffic", params=_given({"window_s": window_s})
        )

    def set_capture(self, deployment: str, policy: dict) -> dict:
        return self._call("PUT", f"/v1/deployments/{deployment}/capture", json=policy)

    def capture_status(self, deployment: str) -> dict:
        return self._call("GET", f"/v1/deployments/{deployment}/capture")

    def capture_off(self, deployment: str) -> dict:
        return self._call("DELETE", f"/v1/deployments/{deployment}/capture")

    def captures(self, **params: Any) -> dict:
        """A page of captures: deployment, since, until, cursor, limit."""
        return self._call("GET", "/v1/captures", params=_given(params))

    def delete_captures(self, **params: Any) -> dict:
        """Delete captures: deployment, since, until (none: all of them)."""
        return self._call("DELETE", "/v1/captures", params=_given(params))

    def delete_capture(self, request_id: str) -> dict:
        return self._call("DELETE", f"/v1/captures/{request_id}")

    def export_captures(
        self, deployment: str, out: BinaryIO, **params: Any
    ) -> tuple[int, httpx.Headers]:
        """Stream a deployment's captures as chat JSONL into `out`: (lines written, the
        response's headers)."""
        lines = 0
        try:
            with self.http.stream(
                "GET", f"/v1/deployments/{deployment}/captures/export", params=_given(params)
            ) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    lines += chunk.count(b"\n")  # the server ends every line with one
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.http.base_url}: {exc}") from exc
        return lines, response.headers

    # OpenAI's Files and Batch APIs

    def upload_file(self, data: bytes, filename: str, purpose: str = "batch") -> dict:
        files = {"file": (filename, data, "application/jsonl")}
        return self._call("POST", "/v1/files", data={"purpose": purpose}, files=files)

    def file_content(self, file_id: str) -> bytes:
        try:
            response = self.http.get(f"/v1/files/{file_id}/content")
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.http.base_url}: {exc}") from exc
        _raise_for_error(response)
        return response.content

    def create_batch(self, input_file_id: str, metadata: dict[str, str] | None = None) -> dict:
        body = {
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        }
        return self._call("POST", "/v1/batches", json=body)

    def batch(self, batch_id: str) -> dict:
        return self._call("GET", f"/v1/batches/{batch_id}")

    def batches(self, limit: int = 20) -> dict:
        return self._call("GET", "/v1/batches", params={"limit": limit})

    def cancel_batch(self, batch_id: str) -> dict:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel")

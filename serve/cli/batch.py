"""Batches: a file of chat requests run on what live traffic leaves of the engine (OpenAI's Batch
API; tenant key)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.errors import LorafleetError
from lorafleet.serve.cli.common import DEFAULT_URL, ApiKey, Url, console, group, progress, when
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["batch", "batch_lines"]

batch = group("Batches of chat requests, run on the engine's idle capacity (tenant key).")

FINISHED = ("completed", "failed", "expired", "cancelled")


def batch_lines(text: str, deployment: str | None) -> bytes:
    """The Batch API's request lines of a file: lines already in its shape (`custom_id`, `url`,
    `body`), or chat requests (`{"messages": [...], ...}`, the trainer's chat JSONL included,
    its last assistant turn dropped), each given `custom_id` `line-N` and `model` =
    `deployment` (which also replaces the model of lines in the API's shape)."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise LorafleetError(f"line {number}: not valid JSON ({exc})") from exc
        if not isinstance(line, dict):
            raise LorafleetError(f"line {number}: not a JSON object")
        if "body" not in line:  # a chat request
            messages = line.get("messages") or []
            if (
                messages
                and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"
            ):
                messages = messages[:-1]  # a training example: the question alone
            line = {
                "custom_id": f"line-{number}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**line, "messages": messages},
            }
        if deployment:
            line["body"] = {**line["body"], "model": deployment}
        elif not line["body"].get("model"):
            raise LorafleetError(f"line {number}: no model: pass --deployment")
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode()


def _print_batch(b: dict) -> None:
    counts = b["request_counts"]
    console.print(
        f"{b['id']}: [bold]{b['status']}[/bold]  {counts['completed']} answered, "
        f"{counts['failed']} failed of {counts['total']}; created {when(b['created_at'])}, "
        f"expires {when(b['expires_at'])}",
        highlight=False,
    )
    if b.get("output_file_id") or b.get("error_file_id"):
        console.print(
            f"  output {b.get('output_file_id') or '-'}, errors {b.get('error_file_id') or '-'}",
            highlight=False,
        )
    for error in (b.get("errors") or {}).get("data", []):
        console.print(f"  [red]{error['code']}: {error['message']}[/red]", highlight=False)


def _follow(client: LorafleetClient, b: dict) -> dict:
    """Until the batch has finished, a progress bar of its answered lines."""
    with progress(f"batch {b['id']}", "lines") as update:
        while b["status"] not in FINISHED:
            counts = b["request_counts"]
            update(counts["completed"] + counts["failed"], counts["total"], b["status"])
            time.sleep(1)
            b = client.batch(b["id"])
        counts = b["request_counts"]
        update(counts["completed"] + counts["failed"], counts["total"], b["status"])
    return b


@batch.command("submit")
def batch_submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL requests.")],
    deployment: Annotated[
        Optional[str],
        typer.Option(help="The deployment every line runs on (else each line's `body.model`)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow it to the end with a progress bar.")] = True,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE (the Batch API's lines, or chat requests / the trainer's chat JSONL) and run
    it as a batch within 24 h."""
    client = LorafleetClient(url, api_key)
    uploaded = client.upload_file(batch_lines(file.read_text(), deployment), file.name)
    b = client.create_batch(uploaded["id"])
    console.print(f"batch {b['id']} of {b['request_counts']['total']} lines", highlight=False)
    if wait:
        b = _follow(client, b)
    _print_batch(b)
    if b["status"] in ("failed", "expired"):
        raise typer.Exit(1)


@batch.command("status")
def batch_status(
    batch_id: Annotated[Optional[str], typer.Argument()] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One batch, or the latest ones."""
    client = LorafleetClient(url, api_key)
    if batch_id:
        _print_batch(client.batch(batch_id))
        return
    table = Table("batch", "status", "answered", "failed", "total", "created")
    for b in client.batches()["data"]:
        c = b["request_counts"]
        table.add_row(
            b["id"],
            b["status"],
            str(c["completed"]),
            str(c["failed"]),
            str(c["total"]),
            when(b["created_at"]),
        )
    console.print(table)


@batch.command("results")
def batch_results(
    batch_id: str,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead.")] = False,
    out: Annotated[Optional[Path], typer.Option("-o", help="Write here (default: stdout).")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A finished batch's output (or error) file: one JSON line per request."""
    client = LorafleetClient(url, api_key)
    b = client.batch(batch_id)
    file_id = b["error_file_id" if errors else "output_file_id"]
    if b["status"] not in FINISHED:
        raise LorafleetError(f"batch {batch_id} is {b['status']}: its files come when it ends")
    if file_id is None:
        raise LorafleetError(f"batch {batch_id} has no {'error' if errors else 'output'} file")
    data = client.file_content(file_id)
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
        lines = data.count(b"\n")
        console.print(f"{lines} lines written to {out}", highlight=False)


@batch.command("cancel")
def batch_cancel(batch_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Stop a batch: lines not yet run are not; what finished is kept."""
    _print_batch(LorafleetClient(url, api_key).cancel_batch(batch_id))

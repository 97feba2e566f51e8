"""A batch's output and error files, in OpenAI's line shape:

    {"id": "batch_req_...", "custom_id": "...",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

Lines answered 2xx go to the output file; every other answer (its status and error body) and every
line that never ran (the batch was cancelled or expired first: `response` null, `error` saying
which) go to the error file. Both in the input file's order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from lorafleet.adapters.catalog import BatchLine
from lorafleet.serve.batches.lines import RequestLine

__all__ = ["result_files", "NOT_RUN"]

# why a line never ran, by the batch's end
NOT_RUN = {
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "expired": ("batch_expired", "the batch's completion window ended before this request ran"),
}


def _line_id(batch_id: str, line: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def _dumps(value: dict) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def result_files(
    batch_id: str, requests: Sequence[RequestLine], finished: Iterable[BatchLine], ending: str
) -> tuple[bytes, bytes]:
    """The output and the error file of a batch that ends as `ending`, from its requests and
    its finished lines."""
    done = {row.line: row for row in finished}
    output, errors = bytearray(), bytearray()
    for request in requests:
        row = done.get(request.line)
        if row is None:
            code, message = NOT_RUN.get(ending, ("batch_failed", "this request did not run"))
            errors += _dumps(
                {
                    "id": _line_id(batch_id, request.line),
                    "custom_id": request.custom_id,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
            )
            continue
        line = {
            "id": _line_id(batch_id, request.line),
            "custom_id": row.custom_id,
            "response": {"status_code": row.status, "request_id": row.request_id, "body": row.body},
            "error": None,
        }
        (output if 200 <= row.status < 300 else errors).extend(_dumps(line))
    return bytes(output), bytes(errors)

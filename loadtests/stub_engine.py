"""An instant OpenAI-shaped upstream for measuring the gateway alone (benchmarks only, never the
product).

Answers vLLM's routes the gateway uses (`/health`, `/version`, `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, `/v1/chat/completions`, streamed or not, with the tokens' logprobs when
asked and vLLM's per-request `metrics`) at once with a canned answer of `--tokens` tokens, over
plain asyncio streams so that it costs as little CPU as possible; HTTP/1.1 keep-alive,
Content-Length bodies only.

    .venv/bin/python loadtests/stub_engine.py --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

# as vLLM's
_TOKEN = {
    "token": "word ",
    "logprob": -0.0123,
    "bytes": [119, 111, 114, 100, 32],
    "top_logprobs": [],
}


# vLLM's per-request times (`--enable-per-request-metrics`): the gateway's engine time
METRICS = {
    "time_to_first_token_ms": 12.5,
    "generation_time_ms": 37.5,
    "queue_time_ms": 0.5,
    "mean_itl_ms": 2.5,
    "tokens_per_second": 320.0,
}


def _logprobs(tokens: int, asked: bool) -> dict | None:
    return {"content": [_TOKEN] * tokens} if asked else None


def _chat(model: str, tokens: int, logprobs: bool, request_id: str) -> bytes:
    return json.dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "word " * tokens},
                    "logprobs": _logprobs(tokens, logprobs),
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 40,
                "completion_tokens": tokens,
                "total_tokens": 40 + tokens,
            },
            "metrics": METRICS,
        }
    ).encode()


def _stream(model: str, tokens: int, logprobs: bool, request_id: str) -> bytes:
    chunks = [
        {
            "id": request_id,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "word "},
                    "logprobs": _logprobs(1, logprobs),
                    "finish_reason": None,
                }
            ],
        }
        for _ in range(tokens)
    ]
    chunks.append(
        {
            "id": request_id,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": 40,
                "completion_tokens": tokens,
                "total_tokens": 40 + tokens,
            },
            "metrics": METRICS,
        }
    )
    return (
        b"".join(
            b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks
        )
        + b"data: [DONE]\n\n"
    )


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
        % (status, content_type, len(body))
        + body
    )


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            length = next(
                (
                    int(h.split(":", 1)[1])
                    for h in header_lines
                    if h.lower().startswith("content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length) if length else b""
            # as vLLM: the caller's X-Request-Id is the answer's id
            request_id = "chatcmpl-" + next(
                (
                    h.split(":", 1)[1].strip()
                    for h in header_lines
                    if h.lower().startswith("x-request-id:")
                ),
                "stub",
            )
            if path == "/v1/chat/completions":
                request = json.loads(body)
                logprobs = bool(request.get("logprobs"))
                if request.get("stream"):
                    out = _response(
                        200,
                        _stream(request["model"], tokens, logprobs, request_id),
                        b"text/event-stream",
                    )
                else:
                    out = _response(200, _chat(request["model"], tokens, logprobs, request_id))
            elif path == "/version":
                out = _response(200, b'{"version": "stub"}')
            else:  # /health, adapter loads and unloads
                out = _response(200, b"{}")
            writer.write(out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, tokens: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, tokens), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.port, args.tokens))

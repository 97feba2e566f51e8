"""`POST /v1/chat/completions` in the OpenAPI document: OpenAI's request shape, as the gateway
accepts it.

The route is a plain Starlette route (see `lorafleet.serve.api.chat`), so FastAPI cannot describe
it. The gateway reads only `model`, `messages`, `stream` and image URLs and forwards the rest to the
engine, so every object here allows extra fields: the engine's own sampling parameters are valid
too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHAT_PATH", "chat_operation", "chat_schemas"]

CHAT_PATH = "/v1/chat/completions"

Spec = dict[str, Any]


def _ref(name: str) -> Spec:
    return {"$ref": f"#/components/schemas/{name}"}


def _optional(schema: Spec) -> Spec:
    return {"anyOf": [schema, {"type": "null"}]}


def chat_schemas(example_model: str) -> dict[str, Spec]:
    """The request's and the answer's component schemas."""
    return {
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "additionalProperties": True,
            "properties": {
                "model": {
                    "type": "string",
                    "minLength": 1,
                    "examples": [example_model],
                    "description": "one of your deployments",
                },
                "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                "stream": {"type": "boolean", "default": False},
                "max_tokens": _optional({"type": "integer", "minimum": 1}),
                "max_completion_tokens": _optional({"type": "integer", "minimum": 1}),
                "temperature": _optional({"type": "number", "minimum": 0, "maximum": 2}),
                "top_p": _optional({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
                "seed": _optional({"type": "integer"}),
                "stop": _optional(
                    {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
                ),
                "user": {
                    "type": "string",
                    "description": "the sticky unit of a rollout, with x-session-id",
                },
            },
        },
        "ChatMessage": {
            "type": "object",
            "required": ["role", "content"],
            "additionalProperties": True,
            "properties": {
                "role": {"enum": ["system", "user", "assistant"]},
                "content": {
                    "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("ContentPart")}]
                },
            },
        },
        "ContentPart": {"oneOf": [_ref("TextPart"), _ref("ImageUrlPart")]},
        "TextPart": {
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        },
        "ImageUrlPart": {
            "type": "object",
            "required": ["type", "image_url"],
            "properties": {
                "type": {"const": "image_url"},
                "image_url": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {
                            "type": "string",
                            "pattern": "^(data:image/|https?://)",
                            "description": (
                                "a data URL; http(s) only where remote images are enabled"
                            ),
                        },
                        "detail": {"enum": ["auto", "low", "high"]},
                    },
                },
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "model": {"type": "string"},
                "choices": {"type": "array"},
                "usage": {"type": "object"},
            },
        },
    }


def chat_operation(example_model: str) -> Spec:
    """The operation object (security and errors are added with every other route's)."""
    example = {
        "model": example_model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "What is in the image?"}],
    }
    return {
        "operationId": "chat_completions",
        "summary": "Chat Completions",
        "description": "OpenAI's chat completions on one of your deployments; `stream` answers "
        "server-sent events. Answers carry x-lorafleet-deployment, x-lorafleet-adapter and "
        "x-lorafleet-variant.",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("ChatCompletionRequest"), "example": example}
            },
        },
        "responses": {
            "200": {
                "description": "The completion, or its chunks when `stream` is true",
                "content": {
                    "application/json": {"schema": _ref("ChatCompletion")},
                    # Server-sent events: each `data:` a chat.completion.chunk as JSON, the last
                    # `data: [DONE]`. Typed as the text and as one event (data, event), the two ways
                    # tools read a stream's schema.
                    "text/event-stream": {
                        "schema": {
                            "type": ["string", "object"],
                            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                        }
                    },
                },
            }
        },
    }

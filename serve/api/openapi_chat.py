"""`POST /v1/chat/completions` in the OpenAPI document: OpenAI's request shape, as the gateway
accepts it.

The route is a plain Starlette route (see `lorafleet.serve.api.chat`), so FastAPI cannot describe
it. The gateway reads only `model`, `messages`, `stream` and image URLs and forwards the rest to the
engine, so every object here allows extra fields: the engine's own sampling parameters are valid
too.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHAT_PATH",
    "RESPONSES_PATH",
    "chat_operation",
    "chat_schemas",
    "responses_operation",
    "responses_schemas",
]

CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"

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


def responses_schemas(example_model: str) -> dict[str, Spec]:
    """OpenAI's Responses request as the gateway serves it (stateless, messages only), and the
    Response."""
    text = {"type": "object", "properties": {"type": {"const": "input_text"}, "text": {}}}
    image = {
        "type": "object",
        "properties": {"type": {"const": "input_image"}, "image_url": {"type": "string"}},
    }
    return {
        "ResponseRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "examples": [example_model]},
                "input": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "minItems": 1, "items": _ref("ResponseInputMessage")},
                    ]
                },
                "instructions": _optional({"type": "string"}),
                "max_output_tokens": _optional({"type": "integer", "minimum": 1}),
                "temperature": _optional({"type": "number", "minimum": 0, "maximum": 2}),
                "top_p": _optional({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
                "stream": {"type": "boolean", "default": False},
                "store": {
                    "type": "boolean",
                    "description": "accepted; nothing is stored (the answer says false)",
                },
                "metadata": {"type": "object"},
                "user": {"type": "string"},
                "text": {"type": "object", "description": "format: text, json_object, json_schema"},
            },
        },
        "ResponseInputMessage": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "type": {"const": "message"},
                "role": {"enum": ["user", "assistant", "system", "developer"]},
                "content": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"anyOf": [text, image]}},
                    ]
                },
            },
        },
        "Response": {
            "type": "object",
            "required": ["id", "object", "status", "model", "output"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "response"},
                "status": {"enum": ["completed", "incomplete"]},
                "model": {"type": "string"},
                "output": {"type": "array"},
                "usage": {"type": "object"},
                "store": {"const": False},
            },
        },
    }


def responses_operation(example_model: str) -> Spec:
    """`POST /v1/responses` (security and errors are added with every other route's)."""
    example = {"model": example_model, "input": "What is in the image?", "max_output_tokens": 8}
    return {
        "operationId": "create_response",
        "summary": "Create Response",
        "description": "OpenAI's Responses API on one of your deployments, stateless: the chat "
        "completion it means, answered as a Response (`stream`: the Responses stream's events). "
        "previous_response_id, conversation, background and tools are refused with 400.",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("ResponseRequest"), "example": example}
            },
        },
        "responses": {
            "200": {
                "description": "The Response, or its events when `stream` is true",
                "content": {
                    "application/json": {"schema": _ref("Response")},
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

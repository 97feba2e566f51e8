"""A deployment's declared answer format (a JSON schema or a regex) and the check of one answer against it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

import jsonschema

from adapters.errors import InvalidRequest

__all__ = ["check_format_spec", "format_checker"]


def check_format_spec(spec: dict) -> dict | None:
    """Validate `{"json_schema": {...}}`, `{"regex": "..."}` or `{}` (no format); return what to store."""
    spec = {k: v for k, v in spec.items() if v is not None}
    if not spec:
        return None
    if len(spec) != 1 or next(iter(spec)) not in ("json_schema", "regex"):
        raise InvalidRequest("declare exactly one of 'json_schema' (an object) or 'regex' (a string)",
                             code="invalid_answer_format")
    if "regex" in spec:
        if not isinstance(spec["regex"], str):
            raise InvalidRequest("'regex' must be a string", code="invalid_answer_format")
        try:
            re.compile(spec["regex"])
        except re.error as exc:
            raise InvalidRequest(f"invalid regex {spec['regex']!r}: {exc}", code="invalid_answer_format") from exc
        return spec
    schema = spec["json_schema"]
    if not isinstance(schema, dict):
        raise InvalidRequest("'json_schema' must be a JSON object", code="invalid_answer_format")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc.message}", code="invalid_answer_format") from exc
    return spec


@lru_cache(maxsize=1024)
def _compiled(spec_json: str) -> Callable[[str], bool]:
    spec = json.loads(spec_json)
    if "regex" in spec:
        pattern = re.compile(spec["regex"])
        return lambda text: pattern.fullmatch(text.strip()) is not None
    validator = jsonschema.validators.validator_for(spec["json_schema"])(spec["json_schema"])

    def valid_json(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False

    return valid_json


def format_checker(spec: dict) -> Callable[[str], bool]:
    """Whether an answer (the assistant's text, stripped for regexes) has the declared format."""
    return _compiled(json.dumps(spec, sort_keys=True))

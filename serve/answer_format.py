"""A deployment's declared answer format (a JSON schema or a regex) and the check of one answer against it.

Checks are CPU work: callers run them off the event loop. A tenant's regex is matched with a time bound
(`regex`'s timeout), so a pathological pattern marks the answer invalid instead of hanging a worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import lru_cache

import jsonschema
import regex

from lorafleet.adapters.errors import InvalidRequest

__all__ = ["check_format_spec", "answer_checker", "REGEX_TIMEOUT_S"]

log = logging.getLogger("lorafleet.answer_format")
REGEX_TIMEOUT_S = 0.5  # longest a regex may take on one answer


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
            regex.compile(spec["regex"])
        except regex.error as exc:
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
        pattern = regex.compile(spec["regex"])

        def matches(text: str) -> bool:
            try:
                return pattern.fullmatch(text.strip(), timeout=REGEX_TIMEOUT_S) is not None
            except TimeoutError:
                log.warning("answer-format regex %r took over %.1f s on one answer: counted invalid",
                            spec["regex"][:60], REGEX_TIMEOUT_S)
                return False

        return matches
    validator = jsonschema.validators.validator_for(spec["json_schema"])(spec["json_schema"])

    def valid_json(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False

    return valid_json


def answer_checker(spec: dict) -> Callable[[str], bool]:
    """Whether an answer (the assistant's text, stripped for regexes) has the declared format."""
    return _compiled(json.dumps(spec, sort_keys=True))

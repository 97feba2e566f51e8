"""A deployment's declared answer format (a JSON schema, a regex or a choice of answers), the check
of one answer against it, and, where the deployment enforces it, the engine's structured-output
constraint that makes every answer have it.

Checks are CPU work on a worker thread, which cannot be interrupted, so every check is bounded from
inside:
- a regex runs on `regex` with a timeout; its compile cost (nested counted repeats are expanded:
  `(?:a{3000}){1000}` takes 800 MB) and nesting (deep groups overflow the parser's recursion) are
  refused at declaration;
- a JSON schema runs on a `jsonschema` validator whose every keyword first checks one deadline per
  answer, whose `pattern`, `patternProperties` and `additionalProperties` use those bounded regexes
  instead of Python's `re`, and whose `$ref`s resolve only inside the schema (never over the
  network); its size and depth are limited.
A check that runs out of time counts the answer invalid.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import jsonschema
import referencing
import regex
from jsonschema.exceptions import ValidationError
from referencing.exceptions import Unresolvable

from lorafleet.errors import InvalidRequest

__all__ = [
    "check_format_spec",
    "answer_checker",
    "enforce_format",
    "CLIENT_CONSTRAINTS",
    "MAX_CHOICES",
    "REGEX_TIMEOUT_S",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_REGEX_CHARS",
    "MAX_REGEX_DEPTH",
    "MAX_REGEX_REPEAT",
]

log = logging.getLogger("lorafleet.answer_format")
# longest one answer's check may take (a regex, or every keyword of a schema together)
REGEX_TIMEOUT_S = 0.5
MAX_SPEC_BYTES = 64 * 1024  # the declared format, as JSON
MAX_SPEC_DEPTH = 32  # nesting of the declared JSON schema
MAX_REGEX_CHARS = 2000
MAX_CHOICES = 256  # answers of a `choice` format, each of at most MAX_CHOICE_CHARS
MAX_CHOICE_CHARS = 200
_KINDS = ("json_schema", "regex", "choice")
MAX_REGEX_DEPTH = 32  # nested groups
# sum over counted repeats of the product of the counts they are nested in
MAX_REGEX_REPEAT = 10_000
# nested sets and verbose comments defeat the scan below
_INLINE_FLAGS = regex.compile(r"\(\?[a-zA-Z^-]*(?:V1|x)")
_COUNT = regex.compile(r"\{(\d*)(?:,(\d*))?\}")
# unknown URIs are unresolvable: jsonschema's default registry fetches them
_NO_RETRIEVAL = referencing.Registry()
_REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")


def _refuse(reason: str) -> InvalidRequest:
    return InvalidRequest(f"invalid answer format: {reason}", code="invalid_answer_format")


# --- regexes ---


def _skip_class(pattern: str, i: int) -> int:
    """The index after the character class that starts at `pattern[i] == "["`."""
    i += 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1  # a leading "]" is a member
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _repeat_cost(pattern: str) -> tuple[int, int]:
    """(expansion cost, deepest group nesting) of a pattern: each counted repeat costs its
    largest count times the counts of the groups around it."""
    stack, i, deepest = [0], 0, 0
    while i < len(pattern):
        char, weight = pattern[i], 1
        if char == "(":
            stack.append(0)
            deepest = max(deepest, len(stack) - 1)
            i += 1
            continue
        if char == ")" and len(stack) > 1:
            weight = max(stack.pop(), 1)
            i += 1
        elif char == "[":
            i = _skip_class(pattern, i)
        else:
            i += 2 if char == "\\" else 1
        count = _COUNT.match(pattern, i)
        if count:
            stack[-1] += weight * max(int(n or 0) for n in count.groups())
            i = count.end()
        elif weight > 1:
            stack[-1] += weight  # an uncounted group costs what it holds
    return sum(stack), deepest


def _check_pattern(pattern: Any, where: str) -> str:
    """A pattern that compiles within the limits, or the 400 that says which limit it passes."""
    if not isinstance(pattern, str):
        raise _refuse(f"{where} must be a string")
    if len(pattern) > MAX_REGEX_CHARS:
        raise _refuse(f"{where} has {len(pattern)} characters; the limit is {MAX_REGEX_CHARS}")
    if _INLINE_FLAGS.search(pattern):
        raise _refuse(f"{where}: the inline flags V1 and x are not supported")
    cost, depth = _repeat_cost(pattern)
    if depth > MAX_REGEX_DEPTH:
        raise _refuse(f"{where} nests groups {depth} deep; the limit is {MAX_REGEX_DEPTH}")
    if cost > MAX_REGEX_REPEAT:
        raise _refuse(
            f"{where} repeats {cost} times when counted repeats are expanded; "
            f"the limit is {MAX_REGEX_REPEAT}"
        )
    try:
        _compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise _refuse(f"invalid regex {pattern[:80]!r} in {where}: {exc}") from exc
    return pattern


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


# --- the time bound of one check (thread-local: each worker thread checks one answer at a time) ---


class _OutOfTime(Exception):
    pass


_budget = threading.local()


def _remaining() -> float:
    left = getattr(_budget, "deadline", 0.0) - time.monotonic()
    if left <= 0:
        raise _OutOfTime
    return left


def _search(pattern: str, text: str) -> bool:
    try:
        return _compile(pattern).search(text, timeout=_remaining()) is not None
    except TimeoutError as exc:
        raise _OutOfTime from exc


def _within_budget(check: Callable[[], bool], seconds: float) -> bool | None:
    """`check()` with `seconds` for the regexes and keywords it runs; None when it ran out of
    them."""
    _budget.deadline = time.monotonic() + seconds
    try:
        return check()
    except (_OutOfTime, RecursionError):  # a deep answer or a recursive schema is out of budget too
        return None


# --- JSON schemas ---


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r:.60} does not match {pattern!r:.60}")


def _pattern_properties(
    validator: Any, patterns: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, extra: Any, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    patterns = schema.get("patternProperties", {})
    extras = [
        key
        for key in instance
        if key not in schema.get("properties", {}) and not any(_search(p, key) for p in patterns)
    ]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif extra is False and extras:
        yield ValidationError(
            f"additional properties are not allowed ({', '.join(map(repr, extras))[:80]})"
        )


def _spending(keyword: Callable) -> Callable:
    """A keyword that first checks the answer's deadline, so no schema loops past it."""

    def bounded(
        validator: Any, value: Any, instance: Any, schema: dict
    ) -> Iterator[ValidationError]:
        _remaining()
        errors = keyword(validator, value, instance, schema)
        if errors is not None:
            yield from errors

    return bounded


@lru_cache(maxsize=16)
def _bounded_validator(base: type) -> type:
    own = {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    }
    validators = base.VALIDATORS  # type: ignore[attr-defined]
    keywords = {name: _spending(own.get(name, keyword)) for name, keyword in validators.items()}
    return jsonschema.validators.extend(base, keywords)


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_SPEC_DEPTH:
        raise _refuse(f"the declared format nests deeper than {MAX_SPEC_DEPTH} levels")
    for member in (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    ):
        _check_depth(member, depth + 1)


def _walk(schema: Any) -> Iterator[tuple[str, Any]]:
    """(keyword, value) of every object member of a schema (`_check_depth` bounds the recursion)."""
    members = (
        schema.items()
        if isinstance(schema, dict)
        else enumerate(schema)
        if isinstance(schema, list)
        else ()
    )
    for key, value in members:
        if isinstance(schema, dict):
            yield str(key), value
        yield from _walk(value)


def _check_schema_members(schema: dict) -> None:
    """Refuse the members that could escape the bounds: remote or dangling references, unbounded
    regexes."""
    for key, value in _walk(schema):
        if key in _REF_KEYS:
            if not isinstance(value, str) or not value.startswith("#"):
                raise _refuse(
                    f"{key} {value!r:.80}: only references inside the schema (#/...) are allowed"
                )
        elif key == "pattern" and isinstance(value, str):
            _check_pattern(value, f"pattern {value[:40]!r}")
        elif key == "patternProperties" and isinstance(value, dict):
            for pattern in value:
                _check_pattern(pattern, f"patternProperties key {pattern[:40]!r}")
        elif key == "unevaluatedProperties" and _mentions(schema, "patternProperties"):
            # jsonschema's `re`
            raise _refuse("unevaluatedProperties cannot be combined with patternProperties")


def _mentions(schema: Any, keyword: str) -> bool:
    return any(key == keyword for key, _ in _walk(schema))


_PROBES: tuple[Any, ...] = (None, True, 0, 1.5, "", "a", [], [0], {}, {"a": 0}, [[[[[[[[]]]]]]]])


def _check_json_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise _refuse("'json_schema' must be a JSON object")
    _check_schema_members(schema)
    declared = schema.get("$schema")
    if declared is not None and (
        not isinstance(declared, str)
        or jsonschema.validators.validator_for(schema, default=None) is None  # type: ignore[arg-type]
    ):
        raise _refuse(f"unknown $schema {declared!r:.80}")
    base = jsonschema.validators.validator_for(schema)
    try:
        base.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _refuse(f"invalid JSON schema: {exc.message}") from exc
    validator = _bounded_validator(base)(schema, registry=_NO_RETRIEVAL)
    for probe in _PROBES:  # a reference cycle or a dangling reference shows on the simplest answers
        try:
            if (
                _within_budget(functools.partial(validator.is_valid, probe), REGEX_TIMEOUT_S)
                is None
            ):
                raise _refuse(
                    f"checking the answer {json.dumps(probe)} recursed without end or took over "
                    f"{REGEX_TIMEOUT_S} s (a $ref cycle, or a schema that multiplies its own work?)"
                )
        except Unresolvable as exc:
            raise _refuse(f"unresolvable reference: {exc}") from exc


def _check_choice(choice: Any) -> None:
    if (
        not isinstance(choice, list)
        or not 0 < len(choice) <= MAX_CHOICES
        or not all(isinstance(c, str) and 0 < len(c.strip()) <= MAX_CHOICE_CHARS for c in choice)
    ):
        raise _refuse(
            f"'choice' must be a list of 1 to {MAX_CHOICES} answers, each a string of 1 to "
            f"{MAX_CHOICE_CHARS} characters"
        )
    if len(set(choice)) != len(choice) or any(c != c.strip() for c in choice):
        raise _refuse("'choice' answers must be distinct, without surrounding spaces")


def check_format_spec(spec: dict) -> dict | None:
    """Validate `{"json_schema": {...}}`, `{"regex": "..."}`, `{"choice": [...]}` (each with
    `"enforce": true` to have the engine produce it) or `{}` (no format); return what to store."""
    spec = {k: v for k, v in spec.items() if v is not None}
    enforce = spec.pop("enforce", False)
    if not isinstance(enforce, bool):
        raise _refuse("'enforce' must be true or false")
    if not spec:
        if enforce:
            raise _refuse("'enforce' needs a format: 'json_schema', 'regex' or 'choice'")
        return None
    if len(spec) != 1 or next(iter(spec)) not in _KINDS:
        raise InvalidRequest(
            "declare exactly one of 'json_schema' (an object), 'regex' (a string) or 'choice' "
            "(a list of answers), and 'enforce' if the engine must produce it",
            code="invalid_answer_format",
        )
    _check_depth(spec)  # first: encoding a deep value would overflow the recursion
    size = len(json.dumps(spec))
    if size > MAX_SPEC_BYTES:
        raise _refuse(f"{size} bytes as JSON; the limit is {MAX_SPEC_BYTES}")
    if "regex" in spec:
        _check_pattern(spec["regex"], "'regex'")
    elif "choice" in spec:
        _check_choice(spec["choice"])
    else:
        _check_json_schema(spec["json_schema"])
    return spec | {"enforce": True} if enforce else spec


# --- checking answers ---


def _regex_checker(pattern: str) -> Callable[[str], bool]:
    compiled = _compile(pattern)

    def matches(text: str) -> bool:
        try:
            return compiled.fullmatch(text.strip(), timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            log.warning(
                "answer-format regex %r took over %.1f s on one answer: counted invalid",
                pattern[:60],
                REGEX_TIMEOUT_S,
            )
            return False

    return matches


def _schema_checker(schema: dict) -> Callable[[str], bool]:
    base = jsonschema.validators.validator_for(schema)
    validator = _bounded_validator(base)(schema, registry=_NO_RETRIEVAL)

    def valid_json(text: str) -> bool:
        def check() -> bool:
            return validator.is_valid(json.loads(text))

        try:
            valid = _within_budget(check, REGEX_TIMEOUT_S)
        # not JSON (or numbers past int's digit limit); a dangling $ref
        except (ValueError, Unresolvable):
            return False
        if valid is None:
            log.warning(
                "answer-format JSON schema took over %.1f s on one answer: counted invalid",
                REGEX_TIMEOUT_S,
            )
        return bool(valid)

    return valid_json


def _choice_checker(choice: list[str]) -> Callable[[str], bool]:
    answers = frozenset(choice)
    return lambda text: text.strip() in answers


@lru_cache(maxsize=1024)
def _compiled(spec_json: str) -> Callable[[str], bool]:
    spec = json.loads(spec_json)
    try:
        check_format_spec(spec)  # a format stored before today's limits is held to them too
    except InvalidRequest as exc:
        log.warning("stored answer format refused (%s): every answer counts invalid", exc.message)
        return lambda text: False
    if "regex" in spec:
        return _regex_checker(spec["regex"])
    if "choice" in spec:
        return _choice_checker(spec["choice"])
    return _schema_checker(spec["json_schema"])


def answer_checker(spec: dict) -> Callable[[str], bool]:
    """Whether an answer (the assistant's text, stripped for regexes) has the declared format."""
    return _compiled(json.dumps(spec, sort_keys=True))


# --- enforcing a format: vLLM's structured outputs ---

# the body fields by which a client asks for its own constraint (OpenAI's, vLLM's and its older
# names): a request with any of them is left as it is
CLIENT_CONSTRAINTS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def enforce_format(body: dict[str, Any], spec: dict | None) -> dict[str, Any]:
    """`body` with the engine constraint of an enforced format `spec` added (OpenAI's
    `response_format` for a JSON schema, vLLM's `structured_outputs` for a regex or a choice);
    as it is when the format is not enforced or the client asked for a constraint of its own
    (a `response_format` of type "text" asks for none)."""
    if not spec or not spec.get("enforce"):
        return body
    own = [field for field in CLIENT_CONSTRAINTS if body.get(field) is not None]
    if own and own != ["response_format"] or _asks_for_format(body.get("response_format")):
        return body
    if "json_schema" in spec:
        schema = {"name": "answer_format", "schema": spec["json_schema"], "strict": True}
        return body | {"response_format": {"type": "json_schema", "json_schema": schema}}
    kind = "regex" if "regex" in spec else "choice"
    return body | {"structured_outputs": {kind: spec[kind]}}


def _asks_for_format(response_format: Any) -> bool:
    return response_format is not None and not (
        isinstance(response_format, dict) and response_format.get("type") == "text"
    )

"""Declared answer formats: what a tenant may declare, and checks of answers that stay within
their time bound."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from lorafleet.errors import InvalidRequest
from lorafleet.serve.answer_format import (
    MAX_CHOICES,
    MAX_SPEC_BYTES,
    REGEX_TIMEOUT_S,
    answer_checker,
    check_format_spec,
    enforce_format,
)

CATASTROPHIC = r"(a|aa)+$"  # exponential backtracking on "aaaa…a!"
SLOW_ANSWER = "a" * 60 + "!"  # unbounded, hours of backtracking
# a loaded CI machine overshoots the engine's timeout; the unbounded check would never return
SLACK_S = 4.0


def _refused(spec: dict, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason) as error:
        check_format_spec(spec)
    assert error.value.code == "invalid_answer_format" and error.value.status == 400


def test_plain_formats_are_stored_as_declared():
    regex_spec = {"regex": r"\d{4}-\d{2}-\d{2}"}
    schema = {
        "json_schema": {
            "type": "object",
            "properties": {"total": {"type": "number"}},
            "required": ["total"],
        }
    }
    assert check_format_spec(regex_spec) == regex_spec
    assert check_format_spec(schema) == schema
    assert check_format_spec({}) is None


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(?:a{3000}){1000}", "repeats 3000000 times"),  # 800 MB at compile time
        ("(" * 40 + "a" + ")" * 40, "nests groups 40 deep"),  # a RecursionError in the regex parser
        ("a" * 2001, "2001 characters"),
        (
            r"(?x)(?: a{3000} # )" "\n" r"){1000}",
            "inline flags",
        ),  # a comment would hide the nesting
        ("(", "invalid regex"),
    ],
)
def test_regex_that_cannot_be_compiled_cheaply_is_refused(pattern, reason):
    _refused({"regex": pattern}, reason)


def test_catastrophic_regex_marks_the_answer_invalid_within_its_bound():
    check = answer_checker(check_format_spec({"regex": CATASTROPHIC}))
    started = time.monotonic()
    assert check(SLOW_ANSWER) is False
    assert time.monotonic() - started < REGEX_TIMEOUT_S + SLACK_S
    assert check("aaaa") is True


def test_schema_pattern_runs_with_the_time_bound_not_pythons_re():
    spec = check_format_spec(
        {
            "json_schema": {
                "type": "object",
                "properties": {"a": {"pattern": CATASTROPHIC}},
                "patternProperties": {CATASTROPHIC: {"type": "string"}},
                "additionalProperties": False,
            }
        }
    )
    check = answer_checker(spec)
    started = time.monotonic()
    assert check(f'{{"a": "{SLOW_ANSWER}"}}') is False
    assert check(f'{{"{SLOW_ANSWER}": "x"}}') is False
    assert time.monotonic() - started < 2 * REGEX_TIMEOUT_S + SLACK_S
    assert check('{"a": "aaa", "aa": "x"}') is True
    assert check('{"a": "aaa", "b": "x"}') is False  # additionalProperties still applies


def test_schema_keywords_keep_their_meaning():
    check = answer_checker(
        check_format_spec(
            {
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z]+$"},
                        "child": {"$ref": "#"},
                    },
                }
            }
        )
    )
    assert check('{"name": "ab", "child": {"name": "cd"}}') is True
    assert check('{"name": "ab", "child": {"name": "CD"}}') is False
    assert check('{"name": 3}') is False
    assert check("not json") is False


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"$ref": "#"}, "recursed without end"),
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "$ref": "#/$defs/a",
            },
            "recursed",
        ),
        ({"$ref": "#/$defs/missing"}, "unresolvable reference"),
        (
            {"$ref": "https://json-schema.org/draft/2020-12/schema"},
            "only references inside the schema",
        ),
        ({"$schema": "http://example.com/mine", "type": "string"}, "unknown \\$schema"),
        ({"$schema": ["x"]}, "unknown \\$schema"),
        ({"type": "string", "pattern": r"(?:a{3000}){1000}"}, "repeats"),
        ({"patternProperties": {"(" * 40 + ")" * 40: {}}}, "nests groups"),
        ({"unevaluatedProperties": False, "patternProperties": {"^a": {}}}, "cannot be combined"),
        ({"type": 5}, "invalid JSON schema"),
    ],
)
def test_schema_that_could_hang_or_escape_is_refused(schema, reason):
    _refused({"json_schema": schema}, reason)


def test_schema_that_multiplies_its_own_work_is_refused():
    defs = {
        f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
        for i in range(30)
    }
    _refused(
        {"json_schema": {"$defs": {**defs, "d30": {"type": "integer"}}, "$ref": "#/$defs/d0"}},
        "took over",
    )


def test_huge_or_deep_format_is_refused():
    _refused(
        {"json_schema": {"enum": ["x" * 1000] * (MAX_SPEC_BYTES // 1000 + 1)}}, "bytes as JSON"
    )
    deep: dict = {}
    for _ in range(40):
        deep = {"not": deep}
    _refused({"json_schema": deep}, "nests deeper than 32")


def test_schema_references_never_reach_the_network():
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/schema.json"
        _refused({"json_schema": {"$ref": url}}, "only references inside the schema")
        # a stored one, declared earlier
        assert answer_checker({"json_schema": {"$ref": url}})('"x"') is False
        assert hits == []
    finally:
        server.shutdown()


def test_answers_that_break_the_json_parser_are_invalid_not_errors():
    check = answer_checker(check_format_spec({"json_schema": {"type": "array"}}))
    assert check("[" * 100_000 + "]" * 100_000) is False  # RecursionError in json.loads
    assert check("1" * 5000) is False  # past int's digit limit: ValueError
    assert check("[[]]") is True


def test_a_choice_of_answers_is_a_format_and_checks_the_stripped_answer():
    spec = {"choice": ["A", "B", "C", "D"]}
    assert check_format_spec(spec) == spec
    check = answer_checker(spec)
    assert check("B") and check(" C\n") and not check("b") and not check("B) red")
    for bad in ([], ["A", "A"], [" A"], ["A", 3], "ABCD", ["x"] * (MAX_CHOICES + 1)):
        _refused({"choice": bad}, "'choice'")


def test_enforce_is_stored_only_when_asked_and_needs_a_format():
    regex_spec = {"regex": "[A-D]"}
    assert check_format_spec({**regex_spec, "enforce": False}) == regex_spec
    assert check_format_spec({**regex_spec, "enforce": True}) == {**regex_spec, "enforce": True}
    assert answer_checker({**regex_spec, "enforce": True})("C")  # enforcing changes no check
    _refused({"enforce": True}, "needs a format")
    _refused({**regex_spec, "enforce": "yes"}, "true or false")
    _refused({"regex": "a", "choice": ["a"]}, "exactly one")


BODY = {"model": "d", "messages": [{"role": "user", "content": "?"}]}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("spec", "added"),
    [
        (
            {"json_schema": SCHEMA, "enforce": True},
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer_format", "schema": SCHEMA, "strict": True},
                }
            },
        ),
        ({"regex": "[A-D]", "enforce": True}, {"structured_outputs": {"regex": "[A-D]"}}),
        ({"choice": ["A", "B"], "enforce": True}, {"structured_outputs": {"choice": ["A", "B"]}}),
    ],
)
def test_an_enforced_format_becomes_the_engines_constraint(spec, added):
    assert enforce_format(BODY, spec) == {**BODY, **added}
    assert enforce_format({**BODY, "response_format": {"type": "text"}}, spec) == {
        **BODY,
        "response_format": {"type": "text"},
        **added,
    }
    # the client's own constraint wins
    for own in (
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"choice": ["x"]}},
        {"guided_regex": "x"},
    ):
        assert enforce_format({**BODY, **own}, spec) == {**BODY, **own}
    # declared only, or no format: the body as it is
    declared = {k: v for k, v in spec.items() if k != "enforce"}
    assert enforce_format(BODY, declared) is BODY and enforce_format(BODY, None) is BODY
